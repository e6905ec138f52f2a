"""How many sockets each session has open, counted across every server process in Redis.

Each socket is a member of its session's sorted set, scored by the time its lease runs out.
The server holding it renews the lease every third of `SOCKET_LEASE_SECONDS` and removes it on
close, so a server that crashes leaks nothing for longer than one lease: expired members are
dropped before each count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.keys import Keys
from core.redis import load_script

logger = logging.getLogger(__name__)


class SocketRegistry:
    def __init__(self, redis: Redis, keys: Keys, max_per_session: int, lease_seconds: float):
        self._redis = redis
        self._keys = keys
        self._max = max_per_session
        self._lease_ms = int(lease_seconds * 1000)
        self._open: dict[str, str] = {}  # socket id -> its session's sockets key
        self._open_script = redis.register_script(load_script("lib_clock.lua", "open_socket.lua"))
        self._refresh_script = redis.register_script(
            load_script("lib_clock.lua", "refresh_sockets.lua")
        )
        self._refresher: asyncio.Task[None] | None = None

    @property
    def max_per_session(self) -> int:
        return self._max

    async def start(self) -> None:
        if self._max > 0:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="socket-leases")

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._open:
            with contextlib.suppress(RedisError, OSError):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for socket_id, key in self._open.items():
                        pipe.zrem(key, socket_id)
                    await pipe.execute()
            self._open.clear()

    async def open(self, token: str) -> str | None:
        """Count a new socket of the session: its id, or None when the session has its maximum
        open already."""
        socket_id = secrets.token_hex(8)
        if self._max <= 0:
            return socket_id
        key = self._keys.sockets(token)
        counted = await self._open_script(keys=[key], args=[socket_id, self._max, self._lease_ms])
        if not int(counted):
            return None
        self._open[socket_id] = key
        return socket_id

    async def close(self, socket_id: str) -> None:
        key = self._open.pop(socket_id, None)
        if key is not None:
            try:
                await self._redis.zrem(key, socket_id)
            except (RedisError, OSError) as exc:
                logger.warning("could not uncount a closed socket (its lease runs out): %s", exc)

    async def refresh(self) -> None:
        """Renew the lease of every socket this process holds (one round trip)."""
        if self._open:
            held = list(self._open.items())
            await self._refresh_script(
                keys=[key for _, key in held],
                args=[self._lease_ms, *(socket_id for socket_id, _ in held)],
            )

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                logger.warning("could not renew socket leases: %s", exc)
