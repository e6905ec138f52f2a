"""The service's numbers for `GET /v1/admin/stats`, read from Redis (nothing here writes).

Sessions and open sockets have no counter of their own (a counter written next to every
session would sit in another Cluster slot, and would drift whenever a TTL ends a session), so
they are counted with SCAN over the deployment's keys. So that an admin call never walks a
large keyspace at once, each call advances the count by at most `SCAN_STEPS` SCAN calls of
`SCAN_COUNT` keys (about 100,000 keys examined): a small keyspace is counted afresh on every
call, a large one over several calls, and until a pass completes the answer is the last
complete pass (`exact`), or before the first one a lower bound. SCAN may return a key twice
while Redis rehashes, so the count is close, not exact to the key.

Workers, the queue and its oldest entry are read directly: each is one command.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from core.keys import Keys
from core.models import ServiceStats
from core.redis import AnyRedis

SCAN_COUNT = 1000
SCAN_STEPS = 100


@dataclass(slots=True)
class _Pass:
    cursor: int = 0
    sessions: int = 0
    sockets: int = 0


class StatsReader:
    """One per server process: it keeps the SCAN pass under way between calls."""

    def __init__(self, redis: AnyRedis, keys: Keys, worker_lease_seconds: float) -> None:
        self._redis = redis
        self._keys = keys
        self._lease_ms = int(worker_lease_seconds * 1000)
        self._pass = _Pass()
        self._done: _Pass | None = None  # the last complete pass
        self._lock = asyncio.Lock()  # one pass at a time: concurrent calls would count twice

    async def read(self) -> ServiceStats:
        now_ms = await self._now_ms()
        async with self._lock:
            counted = await self._count_keys(now_ms)
        waiting, pending, oldest_ms = await self._queue()
        alive = await self._redis.zcount(self._keys.workers_alive, now_ms - self._lease_ms, "+inf")
        return ServiceStats(
            sessions=counted.sessions,
            sessions_exact=counted is self._done,
            sockets_open=counted.sockets,
            workers_alive=int(alive),
            messages_waiting=waiting,
            messages_pending=pending,
            oldest_waiting_seconds=None
            if oldest_ms is None
            else max(0.0, (now_ms - oldest_ms) / 1000),
        )

    async def _now_ms(self) -> int:
        seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _count_keys(self, now_ms: int) -> _Pass:
        """Advance the pass by at most SCAN_STEPS; the complete pass to report, else the
        partial one."""
        match = _glob_escape(self._keys.prefix) + ":*"
        current = self._pass
        for _ in range(SCAN_STEPS):
            cursor, found = await self._redis.scan(current.cursor, match=match, count=SCAN_COUNT)
            names = [str(name) for name in found]  # the client decodes responses
            kinds = [self._keys.kind_of(name) for name in names]
            socket_sets = [
                name for name, kind in zip(names, kinds, strict=True) if kind == "sockets"
            ]
            current.sessions += kinds.count("session")
            if socket_sets:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name in socket_sets:
                        pipe.zcount(name, f"({now_ms}", "+inf")  # leases not run out
                    current.sockets += sum(int(n) for n in await pipe.execute())
            current.cursor = int(cursor)
            if current.cursor == 0:
                self._done, self._pass = current, _Pass()
                return current
        return self._done or current

    async def _queue(self) -> tuple[int, int, int | None]:
        """Waiting (not yet taken by a worker), pending (taken, unanswered), and the time
        (ms) the oldest waiting message was queued, over every partition's stream."""
        waiting, pending, oldest = 0, 0, None
        for stream in self._keys.streams:
            lag, held, first = await self._stream_queue(stream)
            waiting, pending = waiting + lag, pending + held
            if first is not None and (oldest is None or first < oldest):
                oldest = first
        return waiting, pending, oldest

    async def _stream_queue(self, stream: str) -> tuple[int, int, int | None]:
        """One stream's part of `_queue`: the oldest waiting message is the first entry
        after the group's last delivered id. Answered entries are deleted, so the stream
        holds only these."""
        try:
            groups: Any = await self._redis.xinfo_groups(stream)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0, 0, None
            raise
        group = next((g for g in groups if g["name"] == self._keys.group), None)
        if group is None:
            return 0, 0, None
        pending = int(group["pending"])
        lag = group.get("lag")
        if lag is None:  # Redis cannot tell after some deletions: QueueCollector's reading
            lag = max(0, int(await self._redis.xlen(stream)) - pending)
        if int(lag) == 0:
            return 0, pending, None
        first: Any = await self._redis.xrange(
            stream, f"({group['last-delivered-id']}", "+", count=1
        )
        oldest = int(str(first[0][0]).split("-")[0]) if first else None
        return int(lag), pending, oldest


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
