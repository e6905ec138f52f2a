"""How many sockets are open: per session across every server process (in Redis), and per
client address in this process.

Each socket is a member of its session's sorted set, scored by the time its lease runs out.
The server holding it renews the lease every third of `SOCKET_LEASE_SECONDS` and removes it on
close, so a server that crashes leaks nothing for longer than one lease: expired members are
dropped before each count.

The per-address count is this process's own (a dict): it stops one client from holding all of
a process's sockets, costs no round trip, and cannot leak when a process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from redis.exceptions import RedisError

from core.keys import Keys
from core.redis import AnyRedis, load_script

logger = logging.getLogger(__name__)


class TooManySockets(Exception):
    """A socket over a limit: `detail` for the client's error event, `reason` for the close."""

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


class SocketRegistry:
    """The owner of the `sockets:<token>` keys: it alone writes them (open_socket.lua, the
    lease renewals in refresh_sockets.lua, the ZREM on close). It sends its own commands
    rather than going through the session store, as a small sibling of it with one job."""

    def __init__(
        self,
        redis: AnyRedis,
        keys: Keys,
        max_per_session: int,
        lease_seconds: float,
        max_per_address: int = 0,
    ):
        self._redis = redis
        self._keys = keys
        self._max = max_per_session
        self._max_per_address = max_per_address
        self._lease_ms = int(lease_seconds * 1000)
        self._open: dict[str, str] = {}  # socket id -> its session's token
        self._addresses: dict[str, str] = {}  # socket id -> its client address (group)
        self._per_address: dict[str, int] = {}  # client address -> sockets open here
        self._open_script = redis.register_script(load_script("lib_clock.lua", "open_socket.lua"))
        self._refresh_script = redis.register_script(
            load_script("lib_clock.lua", "refresh_sockets.lua")
        )
        self._refresher: asyncio.Task[None] | None = None

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
                    for socket_id, token in self._open.items():
                        pipe.zrem(self._keys.sockets(token), socket_id)
                    await pipe.execute()
            self._open.clear()

    async def open(self, token: str, address: str) -> str:
        """Count a new socket of the session from `address`: its id. Raises TooManySockets when
        the address or the session has its maximum open already."""
        held = self._per_address.get(address, 0)
        if 0 < self._max_per_address <= held:
            raise TooManySockets(
                f"There are already {held} open connections from your address; close one "
                "and reconnect",
                "Too many open connections from this address",
            )
        socket_id = secrets.token_hex(8)
        # Counted before the round trip, so sockets opening at once cannot all squeeze in.
        self._per_address[address] = held + 1
        self._addresses[socket_id] = address
        try:
            await self._count_in_session(token, socket_id)
        except BaseException:
            self._uncount_address(socket_id)
            raise
        return socket_id

    async def _count_in_session(self, token: str, socket_id: str) -> None:
        if self._max <= 0:
            return
        key = self._keys.sockets(token)
        counted = await self._open_script(keys=[key], args=[socket_id, self._max, self._lease_ms])
        if not int(counted):
            raise TooManySockets(
                f"This session already has {self._max} open connections; close one and reconnect",
                "Too many open connections for this session",
            )
        self._open[socket_id] = token

    def _uncount_address(self, socket_id: str) -> None:
        address = self._addresses.pop(socket_id, None)
        if address is not None:
            left = self._per_address.pop(address, 1) - 1
            if left > 0:
                self._per_address[address] = left

    async def close(self, socket_id: str) -> None:
        self._uncount_address(socket_id)
        token = self._open.pop(socket_id, None)
        key = None if token is None else self._keys.sockets(token)
        if key is not None:
            try:
                await self._redis.zrem(key, socket_id)
            except (RedisError, OSError) as exc:
                logger.warning("could not uncount a closed socket (its lease runs out): %s", exc)

    async def refresh(self) -> None:
        """Renew the lease of every socket this process holds: one round trip per partition
        (a script's keys must share a slot on a cluster)."""
        by_partition: dict[int, list[tuple[str, str]]] = {}
        for socket_id, token in self._open.items():
            by_partition.setdefault(self._keys.partition(token), []).append((socket_id, token))
        for held in by_partition.values():
            await self._refresh_script(
                keys=[self._keys.sockets(token) for _, token in held],
                args=[self._lease_ms, *(socket_id for socket_id, _ in held)],
            )

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                logger.warning("could not renew socket leases: %s", exc)
