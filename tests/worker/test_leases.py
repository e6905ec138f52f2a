"""LeaseManager.release with an answered entry, on one Redis and on a cluster."""

from __future__ import annotations

from core.keys import Keys
from core.redis import connect_redis, ensure_group
from tests.conftest import make_settings
from worker.leases import LeaseManager


async def test_release_with_the_answered_entry(any_redis_url: str) -> None:
    """Releasing a lease together with the entry it answered gives the lease up and
    acknowledges and deletes the entry. On a cluster this failed every time (redis-py's
    cluster pipeline refuses EVALSHA), so a worker that took over an entry already answered
    by a dead worker failed it again and again, holding up the session's later messages."""
    settings = make_settings(any_redis_url)
    keys = Keys.from_settings(settings)
    redis = await connect_redis(settings)
    try:
        await ensure_group(redis, keys)
        leases = LeaseManager(redis, keys, "w1", lease_seconds=5)
        token = "t" * 32
        stream = keys.requests_for(token)
        entry = str(await redis.xadd(stream, {"token": token}))
        await redis.xreadgroup(keys.group, "w1", {stream: ">"}, count=10)
        lease = await leases.acquire(token)
        await leases.release(lease, done=entry)
        assert await redis.exists(lease.key) == 0
        assert await redis.xlen(stream) == 0
        assert (await redis.xpending(stream, keys.group))["pending"] == 0
    finally:
        await redis.aclose()
