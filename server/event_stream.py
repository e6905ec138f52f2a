"""`POST /v1/chat/stream`'s answer: one message's events as Server-Sent Events.

Each `data:` is the socket's event JSON (a token event also carries `"token": <delta>`); the
last is `{"done": true, ...}` (core/models.py ChatDone), after the reply's `message` event or
its `error` event. A comment line (`: keepalive`) goes out every SSE_HEARTBEAT_SECONDS while
nothing else does, so proxies keep the connection open.

A response class of its own, not a StreamingResponse: its `__call__` owns the exchange's
subscription to the end, whatever happens (a StreamingResponse's iterator is never closed
when the client goes before it started). A client that disconnects ends only the stream: the
message stays queued and its reply is stored as usual. A client that reads too slowly is
bounded like a socket: the events wait in the exchange's outbox (OUTBOX_MAX_BYTES; past it
they are dropped and the reply is read from the history instead), and a send that takes
longer than SOCKET_SEND_TIMEOUT_SECONDS ends the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core.config import Settings
from core.models import (
    ChatDone,
    ErrorCode,
    ErrorEvent,
    Message,
    NoticeCode,
    NoticeEvent,
    ReplyError,
    reply_event,
    short,
)
from server.api.routes.chat import QUEUED
from server.exchange import HISTORY_POLL_SECONDS, Exchange, ends_conversation

logger = logging.getLogger(__name__)

HEARTBEAT = b": keepalive\n\n"
TIMED_OUT = "No reply within {seconds:g} s; it is still stored in the conversation when it comes"


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, exchange: Exchange, settings: Settings) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
        ]
        self.exchange = exchange
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            streamer = asyncio.create_task(self._stream(send))
            watcher = asyncio.create_task(_disconnect(receive))
            done, _ = await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            for task in (streamer, watcher):
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, OSError, TimeoutError):
                    pass  # the client left, or a send took too long: the stream just ends
                except RedisError as exc:
                    logger.warning("sse stream ended: Redis: %s: %s", type(exc).__name__, exc)
            if streamer in done and not streamer.cancelled() and streamer.exception() is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif watcher in done:
                logger.info(
                    "sse client of session %s left; its reply is stored as usual",
                    short(self.exchange.token),
                )
        finally:
            await self.exchange.aclose()

    async def _send(self, send: Send, chunk: bytes) -> None:
        async with asyncio.timeout(self.settings.socket_send_timeout_seconds):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _event(self, send: Send, event: dict[str, Any]) -> None:
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        await self._send(send, f"data: {text}\n\n".encode())

    async def _stream(self, send: Send) -> None:
        exchange, settings = self.exchange, self.settings
        timeout = settings.http_reply_timeout_seconds
        deadline = time.monotonic() + timeout
        heartbeat = settings.sse_heartbeat_seconds
        final: dict[str, Any] | None = None
        async for event in exchange.events(heartbeat):
            if event is None:
                if time.monotonic() >= deadline:
                    break
                await self._send(send, HEARTBEAT)
                continue
            if event.get("type") == "token":
                event = {**event, "token": event.get("delta", "")}
            await self._event(send, event)
            if event.get("type") == "ack" and not exchange.workers_alive:
                await self._event(send, _queued_notice(exchange.message_id))
            if event.get("type") in ("message", "error"):
                final = event
            if final is not None or ends_conversation(event):
                break
        if final is None and exchange.missed:  # events were dropped: the history has it
            stored = await self._poll_history(send, deadline)
            if stored is not None:
                final = json.loads(reply_event(stored).model_dump_json(exclude_none=True))
                await self._event(send, final)
        if final is None and time.monotonic() >= deadline:
            final = ErrorEvent(
                reply_to=exchange.message_id,
                code=ErrorCode.TIMEOUT,
                detail=TIMED_OUT.format(seconds=timeout),
            ).model_dump(mode="json", exclude_none=True)
            await self._event(send, final)
        await self._event(send, _done(exchange, final))

    async def _poll_history(self, send: Send, deadline: float) -> Message | None:
        """The stored reply, looked for until `deadline`, with heartbeats meanwhile."""
        beat = time.monotonic()
        while time.monotonic() < deadline:
            stored = await self.exchange.stored_reply()
            if stored is not None:
                return stored
            if time.monotonic() - beat >= self.settings.sse_heartbeat_seconds:
                await self._send(send, HEARTBEAT)
                beat = time.monotonic()
            await asyncio.sleep(HISTORY_POLL_SECONDS)
        return None


def _queued_notice(message_id: str) -> dict[str, Any]:
    """What the socket sends its sender after the ack when no worker is running."""
    notice = NoticeEvent(code=NoticeCode.QUEUED, reply_to=message_id, detail=QUEUED)
    return notice.model_dump(mode="json")


def _done(exchange: Exchange, final: dict[str, Any] | None) -> dict[str, Any]:
    error = None
    if final is not None and final.get("type") == "error":
        error = ReplyError(code=final["code"], detail=final["detail"])
    done = ChatDone(
        conversation_id=exchange.token,
        message_id=exchange.message_id,
        reply_id=final.get("id") if final is not None and error is None else None,
        tokens_used=final.get("tokens_used") if final is not None else None,
        error=error,
    )
    return done.model_dump(mode="json", exclude_none=True)


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass
