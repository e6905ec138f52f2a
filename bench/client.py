"""Benchmark clients: chat sockets that time each message, the echo socket, and load loops."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from core.keys import Keys
from core.models import Session, new_id, utcnow

MAX_FRAME = 1024 * 1024


@dataclass
class Reply:
    """The timeline of one message, in `time.perf_counter()` seconds."""

    sent: float
    acked: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    done: float | None = None
    #: `token` events received; each may hold several model tokens (TOKEN_FLUSH_MS).
    tokens: int = 0
    text: str = ""
    error: str | None = None
    finished: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def latency(self) -> float:
        assert self.done is not None
        return self.done - self.sent


class Asker(Protocol):
    async def ask(self, text: str) -> Reply: ...

    async def close(self) -> None: ...


async def open_socket(
    url: str, compression: bool = True, headers: dict[str, str] | None = None
) -> ClientConnection:
    return await connect(
        url,
        additional_headers=headers,
        max_size=MAX_FRAME,
        ping_interval=None,
        open_timeout=60,
        close_timeout=5,
        compression="deflate" if compression else None,
    )


class ChatSocket:
    """One session's socket: `ask()` sends a message and waits for its final reply event."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self._by_client_id: dict[str, Reply] = {}
        self._by_id: dict[str, Reply] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls,
        ws_base: str,
        token: str,
        compression: bool = True,
        headers: dict[str, str] | None = None,
    ) -> ChatSocket:
        """`headers`: extra request headers (a bench's X-Forwarded-For, for one)."""
        return cls(await open_socket(f"{ws_base}/chat?token={token}", compression, headers))

    async def ask(self, text: str) -> Reply:
        client_id = uuid.uuid4().hex
        reply = Reply(sent=time.perf_counter())
        self._by_client_id[client_id] = reply
        await self.websocket.send(
            json.dumps({"type": "message", "msg": text, "client_id": client_id})
        )
        await reply.finished
        return reply

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.websocket:
                now = time.perf_counter()
                event: dict[str, Any] = json.loads(raw)
                kind = event.get("type")
                if kind == "ack":
                    reply = self._by_client_id.pop(event.get("client_id") or "", None)
                    if reply is not None:
                        reply.acked = now
                        self._by_id[event["id"]] = reply
                elif kind == "token":
                    reply = self._by_id.get(event["reply_to"])
                    if reply is not None:
                        reply.tokens += 1
                        reply.text += event["delta"]
                        reply.last_token = now
                        if reply.first_token is None:
                            reply.first_token = now
                elif kind in ("message", "error"):
                    reply = self._by_id.pop(event.get("reply_to") or "", None)
                    if reply is None and kind == "error" and self._by_client_id:
                        # An error without reply_to refuses the message its client_id names
                        # (or, naming none, the oldest unacknowledged one).
                        named = event.get("client_id") or next(iter(self._by_client_id))
                        reply = self._by_client_id.pop(named, None)
                    if reply is not None:
                        reply.done = now
                        if kind == "error":
                            reply.error = str(event.get("code"))
                        if not reply.finished.done():
                            reply.finished.set_result(None)
        _socket_closed([*self._by_client_id.values(), *self._by_id.values()])

    async def close(self) -> None:
        await self.websocket.close()
        await self._reader


class EchoSocket:
    """A socket to the bare echo server: `ask()` waits for the same frame to come back."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self._pending: collections.deque[Reply] = collections.deque()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, ws_base: str, compression: bool = True) -> EchoSocket:
        return cls(await open_socket(f"{ws_base}/echo", compression))

    async def ask(self, text: str) -> Reply:
        reply = Reply(sent=time.perf_counter())
        self._pending.append(reply)
        await self.websocket.send(json.dumps({"type": "message", "msg": text}))
        await reply.finished
        return reply

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _raw in self.websocket:
                reply = self._pending.popleft()
                reply.done = time.perf_counter()
                reply.finished.set_result(None)
        _socket_closed(self._pending)

    async def close(self) -> None:
        await self.websocket.close()
        await self._reader


async def new_sessions(
    http_base: str, count: int, headers: Callable[[int], dict[str, str]] | None = None
) -> list[str]:
    """Sessions made through the API (`POST /token`), as a client would; `headers(i)`: extra
    request headers of the i-th (a bench's X-Forwarded-For, for one)."""
    async with httpx.AsyncClient(base_url=http_base, timeout=60) as client:

        async def one(i: int) -> str:
            response = await client.post(
                "/token",
                params={"name": f"bench-{i}"},
                headers=headers(i) if headers is not None else None,
            )
            response.raise_for_status()
            token: str = response.json()["token"]
            return token

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def seed_sessions(redis: Redis, keys: Keys, count: int, ttl: int = 3600) -> list[str]:
    """Many sessions written straight into Redis (pipelined), for the idle-socket benchmark."""
    tokens: list[str] = []
    for start in range(0, count, 1000):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(count, start + 1000)):
            session = Session(token=new_id(), name=f"idle-{i}", session_start=utcnow())
            pipe.json().set(keys.session(session.token), "$", session.model_dump(mode="json"))
            pipe.expire(keys.session(session.token), ttl)
            tokens.append(session.token)
        await pipe.execute()
    return tokens


async def gather_limited(
    factories: Sequence[Callable[[], Awaitable[Any]]], limit: int
) -> list[Any]:
    """Run the coroutine factories with at most `limit` at once, results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def run(factory: Callable[[], Awaitable[Any]]) -> Any:
        async with semaphore:
            return await factory()

    return list(await asyncio.gather(*(run(f) for f in factories)))


class Meter(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


async def _metered(meter: Meter | None, start: float, end: float) -> None:
    if meter is None:
        return
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    meter.start()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    meter.stop()


@dataclass
class LoadResult:
    replies: list[Reply]
    seconds: float
    lost: int = 0

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.error is None and r.done is not None]

    @property
    def errors(self) -> int:
        return len(self.replies) - len(self.ok) + self.lost

    @property
    def rate(self) -> float:
        return len(self.ok) / self.seconds if self.seconds else 0.0

    def latencies_ms(self) -> list[float]:
        return [1000 * r.latency for r in self.ok]


async def closed_loop(
    askers: Sequence[Asker], seconds: float, warmup: float = 0.5, meter: Meter | None = None
) -> LoadResult:
    """Every socket sends its next message as soon as the last one is answered. Counts the
    replies that finished inside the measured window (after `warmup`)."""
    start = time.perf_counter() + warmup
    end = start + seconds
    replies: list[Reply] = []

    async def run(asker: Asker) -> None:
        while time.perf_counter() < end:
            reply = await asker.ask("hello bench")
            if reply.done is not None and start <= reply.done <= end:
                replies.append(reply)
            elif reply.error is not None:
                replies.append(reply)
                return

    await asyncio.gather(_metered(meter, start, end), *(run(a) for a in askers))
    return LoadResult(replies, seconds)


async def open_loop(
    askers: Sequence[Asker],
    rate: float,
    seconds: float,
    drain_timeout: float = 30.0,
    meter: Meter | None = None,
) -> LoadResult:
    """Send at a fixed offered rate (messages/s) spread round-robin over the sockets, whatever
    the replies do; every message's latency counts."""
    tasks: list[asyncio.Task[Reply]] = []
    start = time.perf_counter()
    metering = asyncio.create_task(_metered(meter, start, start + seconds))
    total = int(rate * seconds)
    for k in range(total):
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(askers[k % len(askers)].ask("hello bench")))
    done, pending = await asyncio.wait(tasks, timeout=drain_timeout) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await metering
    replies = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    return LoadResult(replies, seconds, lost=len(tasks) - len(replies))


def _socket_closed(replies: Iterable[Reply]) -> None:
    """Settle every reply still waiting when its socket closed, as failed."""
    for reply in replies:
        if not reply.finished.done():
            reply.error = "socket closed"
            reply.finished.set_result(None)
