"""Creating the asyncio Redis client and checking that the server can serve us.

One code path for a single Redis and a Redis Cluster: the keys and scripts are the same
(core/keys.py shards them), and `connect_redis` makes the client the server calls for:
`RedisCluster` when `INFO cluster` says cluster mode (or REDIS_MODE=cluster), else `Redis`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any, Literal, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.backoff import EqualJitterBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from core.config import Settings
from core.keys import Keys

# Connections per process. When all are busy a command waits (up to POOL_WAIT_SECONDS) for
# one to come back, instead of failing: redis-py's default pool raises "Too many connections"
# at its 101st concurrent command, which turned a burst of 200 socket opens into HTTP 500s.
MAX_CONNECTIONS = 100
POOL_WAIT_SECONDS = 20.0
# A command refused by a lost connection is retried for 2.75 to 5.5 s in all (waits of 0.1 s
# doubling up to 1 s, each between half and all of that): long enough to ride out a Redis
# restart (the launcher's takes about 1 s to answer again), short enough that a caller hears
# of a real outage in seconds. Fewer, shorter retries ran out while a restarted Redis was
# still loading, and the first message after it was refused.
RETRY_BACKOFF = {"base": 0.05, "cap": 1.0}
RETRIES = 8
# Connections per cluster node. A cluster client has no blocking pool: past this a command
# fails (MaxConnectionsError) instead of waiting, so the bound is set far above what one
# process uses (each worker reader holds one blocking read per partition on its node).
CLUSTER_MAX_CONNECTIONS_PER_NODE = 1000

AnyRedis: TypeAlias = Redis | RedisCluster
RedisMode = Literal["single", "cluster"]


async def redis_mode(settings: Settings) -> RedisMode:
    """REDIS_MODE, or, for `auto`, what the server says (`INFO cluster`: cluster_enabled)."""
    if settings.redis_mode != "auto":
        return settings.redis_mode
    probe = Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, socket_timeout=5, driver_info=driver_info()
    )
    try:
        info: Any = await probe.info("cluster")
    finally:
        await probe.aclose()
    return "cluster" if int(info.get("cluster_enabled", 0)) else "single"


async def connect_redis(settings: Settings) -> AnyRedis:
    """The process's client for the mode of the Redis at REDIS_URL (see `redis_mode`)."""
    return client_for(settings, await redis_mode(settings))


@cache
def driver_info() -> DriverInfo:
    """redis-py's name and version for `CLIENT SETINFO`, looked up once per process.

    Left to itself, redis-py looks its version up in the installed packages' metadata for
    every connection it opens (`importlib.metadata.version`, which scans every installed
    distribution): about 1 ms each on a small virtualenv and more on a machine with many
    packages, so the first burst of 50 concurrent messages, which opens some 50 connections
    in each process, spent 50-100 ms of each process's CPU there."""
    return DriverInfo()


def client_for(settings: Settings, mode: RedisMode) -> AnyRedis:
    return create_cluster_client(settings) if mode == "cluster" else create_redis(settings)


def create_cluster_client(settings: Settings) -> RedisCluster:
    """A Redis Cluster client from any node's URL (it learns the others from CLUSTER SLOTS),
    following MOVED and ASK, retrying as `create_redis` does."""
    return RedisCluster.from_url(
        settings.redis_url,
        decode_responses=True,
        max_connections=CLUSTER_MAX_CONNECTIONS_PER_NODE,
        driver_info=driver_info(),
        retry=Retry(EqualJitterBackoff(**RETRY_BACKOFF), retries=RETRIES),
        health_check_interval=15,
        socket_keepalive=True,
        socket_connect_timeout=5,
    )


def create_redis(settings: Settings) -> Redis:
    """One client (one connection pool) per process; the caller closes it with `aclose()`.

    Commands are retried with backoff across short outages, so a Redis restart is survived
    without the callers noticing more than latency.
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_SECONDS,
        decode_responses=True,
        driver_info=driver_info(),
        retry=Retry(EqualJitterBackoff(**RETRY_BACKOFF), retries=RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=15,
        socket_keepalive=True,
        socket_connect_timeout=5,
    )
    return Redis.from_pool(pool)


def load_script(*names: str) -> str:
    """The Lua source of `names` (files in core/lua/) joined in order: the preludes a script
    needs (`lib_*.lua`, which define local functions) first, then the script itself."""
    lua = resources.files("core").joinpath("lua")
    return "\n".join(lua.joinpath(name).read_text(encoding="utf-8") for name in names)


async def ensure_group(redis: AnyRedis, keys: Keys) -> None:
    """Create every partition's request stream and its consumer group if missing, in one
    round trip (a pipeline, which a cluster client splits by node).

    The groups start at id 0, so messages queued before any worker ever ran are answered.
    """
    async with redis.pipeline(transaction=False) as pipe:
        for stream in keys.streams:
            pipe.xgroup_create(stream, keys.group, id="0", mkstream=True)
        answers = await pipe.execute(raise_on_error=False)
    for answer in answers:
        if isinstance(answer, Exception) and "BUSYGROUP" not in str(answer):
            raise answer


def stream_groups(redis: AnyRedis, keys: Keys) -> list[tuple[str, ...]]:
    """The request streams as one XREADGROUP can read them: all at once from a single
    Redis; one at a time from a cluster, where a command's keys must share a slot."""
    if is_cluster(redis):
        return [(stream,) for stream in keys.streams]
    return [keys.streams]


def is_cluster(redis: object) -> bool:
    return isinstance(redis, RedisCluster)


async def readiness_problem(redis: AnyRedis, keys: Keys) -> str | None:
    """None when Redis answers and JSON and Streams work; else what is wrong, in words."""
    try:
        await redis.ping()
        pipe = redis.pipeline(transaction=False)
        pipe.json().set(keys.probe, "$", {"ok": True})
        pipe.expire(keys.probe, 60)
        pipe.json().get(keys.probe, "$.ok")
        pipe.xadd(keys.probe_stream, {"ok": "1"}, maxlen=1)
        pipe.expire(keys.probe_stream, 60)
        _, _, probe, _, _ = await pipe.execute()
    except ResponseError as exc:
        text = str(exc)
        if "unknown command" in text.lower() and "json" in text.lower():
            return "Redis has no JSON support (load the RedisJSON module or use Redis 8)"
        return f"Redis error: {text}"
    except RedisError as exc:
        return f"Redis unavailable: {exc}"
    except OSError as exc:
        return f"Redis unavailable: {exc}"
    if probe != [True]:
        return "Redis JSON answered unexpectedly"
    return None


async def topology(redis: AnyRedis, keys: Keys) -> dict[str, Any]:
    """What /readyz says of the Redis it runs on: the mode, and for a cluster its state and
    how many masters serve slots (CLUSTER INFO's cluster_size); the request partitions."""
    described: dict[str, Any] = {"mode": "single", "partitions": keys.partitions}
    if isinstance(redis, RedisCluster):
        info: Any = await redis.cluster_info()
        described.update(
            mode="cluster", masters=int(info["cluster_size"]), state=info["cluster_state"]
        )
    return described


async def eviction_warning(redis: AnyRedis) -> str | None:
    """Why this Redis could silently drop the service's keys, if it could; else None.

    Any maxmemory-policy but noeviction evicts when Redis is full: allkeys-* anything (the
    request stream, sessions), volatile-* the keys with a TTL, which are the sessions. A Redis
    that refuses CONFIG (managed services often do) is not second-guessed.
    """
    try:
        config = await redis.config_get("maxmemory-policy")
    except (RedisError, OSError):
        return None
    policy = config.get("maxmemory-policy")
    if not policy or policy == "noeviction":
        return None
    return (
        f"Redis maxmemory-policy is {policy}: when it is full it evicts keys (sessions, "
        "queued messages) instead of refusing writes; set it to noeviction"
    )
