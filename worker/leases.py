"""Per-session leases: one worker at a time generates for a session, so replies stay in order.

A lease is a Redis key holding its owner's id with an expiry. The worker renews the leases it
holds; a worker that dies stops renewing, and its leases lapse after WORKER_LEASE_SECONDS.
Replies are stored only by a script that checks the lease is still the writer's (a fence).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from redis.exceptions import NoScriptError

from core.keys import Keys
from core.models import new_id, short
from core.redis import AnyRedis, is_cluster, load_script

logger = logging.getLogger(__name__)

_FIRST_POLL = 0.02
_MAX_POLL = 0.5


@dataclass(eq=False)
class SessionLease:
    token: str
    key: str
    owner: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    # False from `LeaseManager.claim` until the lease is ours (the first read, or `wait`).
    taken: bool = True
    ms: int = 0

    @property
    def to_take(self) -> tuple[str, str, int] | None:
        """What the session's first read needs to take the lease in its own round trip
        (SessionStore.recent_messages), or None once it is taken."""
        return None if self.taken else (self.key, self.owner, self.ms)


async def finish_entry(redis: AnyRedis, keys: Keys, stream: str, entry_id: str) -> None:
    """Acknowledge and delete a request-stream entry that needs no more work."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xack(stream, keys.group, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()


class LeaseManager:
    def __init__(self, redis: AnyRedis, keys: Keys, consumer: str, lease_seconds: float) -> None:
        self._redis = redis
        self._keys = keys
        self._consumer = consumer
        self._lease_ms = int(lease_seconds * 1000)
        self._renew = redis.register_script(load_script("renew_lease.lua"))
        self._release = redis.register_script(load_script("release_lease.lua"))
        self.held: set[SessionLease] = set()

    def claim(self, token: str) -> SessionLease:
        """A lease on the session, not taken yet: the worker's first read of the session takes
        it in the same round trip (`SessionLease.to_take`), and `wait` takes it when that read
        finds another worker holding it. Renewed from the moment it is taken."""
        owner = f"{self._consumer}:{new_id()}"
        lease = SessionLease(token, self._keys.lease(token), owner, taken=False, ms=self._lease_ms)
        self.held.add(lease)
        return lease

    async def wait(self, lease: SessionLease) -> None:
        """Poll until this worker holds `lease` (its holder released it, or it lapsed)."""
        delay = _FIRST_POLL
        # SET NX GET answers the holder before this call: none (taken now), or this owner (a
        # retried SET whose first answer was lost: ours already), or another worker.
        while await self._redis.set(
            lease.key, lease.owner, nx=True, px=self._lease_ms, get=True
        ) not in (None, lease.owner):
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_POLL)
        lease.taken = True

    async def acquire(self, token: str) -> SessionLease:
        """Wait until this worker holds the session's lease."""
        lease = self.claim(token)
        await self.wait(lease)
        return lease

    def forget(self, lease: SessionLease) -> None:
        """Stop renewing a lease that a script released already (add_reply.lua)."""
        self.held.discard(lease)

    async def release(self, lease: SessionLease, done: str | None = None) -> None:
        """Give the lease up if it is still ours. `done`: the request-stream entry now
        answered, acknowledged and deleted in the same round trip, after the release (the
        stream keeps only work not done yet; see `Keys.requests`). It is on the stream of the
        session's partition, as every entry of the session is."""
        self.held.discard(lease)
        if done is None:
            await self._release(keys=[lease.key], args=[lease.owner])
            return
        stream = self._keys.requests_for(lease.token)
        if is_cluster(self._redis):
            # redis-py's cluster pipeline refuses scripts (EVALSHA): two round trips, each
            # idempotent, in the same order (the lease first, then the entry).
            await self._release(keys=[lease.key], args=[lease.owner])
            await finish_entry(self._redis, self._keys, stream, done)
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(self._release.sha, 1, lease.key, lease.owner)
            pipe.xack(stream, self._keys.group, done)
            pipe.xdel(stream, done)
            try:
                await pipe.execute()
            except NoScriptError:
                # Redis does not know the script yet (first use, or it restarted): the
                # commands are idempotent, so load it and do them again.
                await self._release(keys=[lease.key], args=[lease.owner])
                await finish_entry(self._redis, self._keys, stream, done)

    async def renew_all(self) -> None:
        """Extend every held lease; a lease found taken over is flagged lost."""
        for lease in tuple(self.held):
            if not lease.taken:
                continue
            if not await self._renew(keys=[lease.key], args=[lease.owner, self._lease_ms]):
                logger.warning("lease on session %s was lost", short(lease.token))
                lease.lost.set()
                self.held.discard(lease)
