"""The chat socket: messages in, events out.

Every frame the server sends goes through the socket's `Subscription` queue and one sender
task, so frames from Redis and the server's own error replies never interleave mid-send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect, status
from redis.exceptions import RedisError
from starlette.websockets import WebSocketState

from core.config import Settings
from core.models import ErrorCode, ErrorEvent, NoticeCode, NoticeEvent, dump_event, short
from core.store import Queued, RateLimited, SessionStore
from server.api.deps import HubDep, SettingsDep, SocketsDep, StoreDep
from server.api.errors import REDIS_UNAVAILABLE, unavailable_response
from server.frames import ChatMessage, FrameError, StopGeneration, parse_frame
from server.guards import client_address, origin_allowed
from server.hub import CloseSocket, EventHub, Subscription, SubscriptionOverflow

logger = logging.getLogger(__name__)
router = APIRouter(tags=["chat"])

SESSION_REFUSED = "Session not authenticated or expired token"
BINARY_REFUSED = "Binary frames are not supported: send the message as a text frame"
UNAVAILABLE = "The service is briefly unavailable; nothing was stored. Send it again."
ORIGIN_REFUSED = "Origin not allowed"
TOO_MANY_REASON = "Too many open connections for this session"
QUEUED = (
    "No worker is running right now; your message is queued and will be answered when one starts."
)
_CLOSING = object()  # returned by the receiver when the server is closing the socket


@router.websocket("/chat")
async def chat(
    websocket: WebSocket,
    store: StoreDep,
    hub: HubDep,
    settings: SettingsDep,
    sockets: SocketsDep,
    token: str | None = None,
) -> None:
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, websocket.headers.get("host"), settings.socket_origins):
        logger.info("socket refused: origin %r is not allowed", origin)
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=ORIGIN_REFUSED)
        return
    try:
        if token is None or not await store.touch(token):
            await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=SESSION_REFUSED)
            return
        socket_id = await sockets.open(token)
    except (RedisError, OSError) as exc:
        logger.warning("socket refused: Redis is unreachable (%s)", exc)
        await _refuse_while_unavailable(websocket)
        return
    if socket_id is None:
        await _refuse_one_too_many(websocket, token, sockets.max_per_session)
        return
    try:
        await _serve(websocket, token, store, hub, settings)
    except (RedisError, OSError, TimeoutError) as exc:
        if websocket.client_state is not WebSocketState.CONNECTING:
            raise
        # Subscribing to the session's events failed, before the handshake completed.
        logger.warning("socket refused: could not subscribe to its events (%s)", exc)
        await _refuse_while_unavailable(websocket)
    finally:
        await sockets.close(socket_id)


async def _refuse_while_unavailable(websocket: WebSocket) -> None:
    """Redis is down: refuse the handshake with HTTP 503 and `Retry-After`, the same answer
    as the HTTP routes, so a client can tell it from a refused token (403) and retry.

    uvicorn's websockets-sansio protocol then logs "ASGI callable returned without completing
    handshake" although the 503 went out (upstream: Kludex/uvicorn#3138)."""
    try:
        await websocket.send_denial_response(unavailable_response())
    except RuntimeError:  # a server without the denial-response extension: plain refusal
        await websocket.close(code=status.WS_1011_INTERNAL_ERROR, reason=REDIS_UNAVAILABLE)


async def _refuse_one_too_many(websocket: WebSocket, token: str, limit: int) -> None:
    """Accepted so that the client can read why, then closed with 1008."""
    logger.info("socket refused: session %s has %d open already", short(token), limit)
    await websocket.accept()
    detail = f"This session already has {limit} open connections; close one and reconnect"
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await websocket.send_text(
            dump_event(ErrorEvent(code=ErrorCode.TOO_MANY_CONNECTIONS, detail=detail))
        )
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=TOO_MANY_REASON)


async def _serve(
    websocket: WebSocket, token: str, store: SessionStore, hub: EventHub, settings: Settings
) -> None:
    # Subscribed before the handshake completes: a client whose socket is open receives every
    # event of its session from then on (a second tab included).
    async with hub.subscribe(token) as outbox:
        await websocket.accept()
        logger.info("socket opened for session %s", short(token))
        # The sender is a task; this handler's own task receives. (One task fewer per socket
        # than a task for each: about 1 KiB of an idle socket's cost, docs/benchmarks.md.)
        # If the sender closes the socket first (a resync, a slow client), the client's close
        # reply ends the receiving too.
        sender = asyncio.create_task(_send_events(websocket, outbox))
        try:
            received: object = await _receive_frames(
                websocket,
                token,
                store,
                outbox,
                settings.max_message_chars,
                client_address(websocket),
            )
        except (WebSocketDisconnect, RuntimeError):  # the connection was already gone
            received = None
        try:
            if received is _CLOSING:
                # The server is closing: let the sender deliver what is queued, then the close.
                await asyncio.wait({sender}, timeout=5)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await sender
    logger.info("socket closed for session %s", short(token))


async def _send_events(websocket: WebSocket, outbox: Subscription) -> None:
    try:
        while True:
            frame = await outbox.get()
            if isinstance(frame, CloseSocket):
                await websocket.close(code=frame.code, reason=frame.reason)
                return
            await websocket.send_text(frame)
    except SubscriptionOverflow:
        logger.warning("socket too slow for its events; closing it (the client resyncs)")
        await websocket.close(code=status.WS_1013_TRY_AGAIN_LATER, reason="Too slow; reconnect")


async def _receive_frames(
    websocket: WebSocket,
    token: str,
    store: SessionStore,
    outbox: Subscription,
    max_chars: int,
    address: str,
) -> object:
    """Handle the client's frames until it disconnects (None) or the server closes (_CLOSING)."""

    def reply_error(
        code: ErrorCode,
        detail: str,
        retry_after: int | None = None,
        client_id: str | None = None,
    ) -> None:
        event = ErrorEvent(code=code, detail=detail, retry_after=retry_after, client_id=client_id)
        outbox.put(dump_event(event))

    while True:
        frame = await websocket.receive()
        if frame["type"] == "websocket.disconnect":
            return None
        text = frame.get("text")
        if text is None:
            reply_error(ErrorCode.BAD_REQUEST, BINARY_REFUSED)
            continue
        match parse_frame(text, max_chars):
            case FrameError(code, detail, client_id):
                reply_error(code, detail, client_id=client_id)
            case StopGeneration():
                try:
                    await store.request_stop(token)
                except RedisError:
                    logger.exception("could not pass on a stop for session %s", short(token))
                    reply_error(ErrorCode.SERVICE_UNAVAILABLE, UNAVAILABLE)
            case ChatMessage(message_text, client_id):
                try:
                    stored = await store.queue_message(
                        token, message_text, client_id, address=address
                    )
                except RedisError:
                    logger.exception("could not queue a message for session %s", short(token))
                    reply_error(ErrorCode.SERVICE_UNAVAILABLE, UNAVAILABLE, client_id=client_id)
                    continue
                match stored:
                    case None:
                        reply_error(
                            ErrorCode.SESSION_EXPIRED,
                            "Session expired or does not exist",
                            client_id=client_id,
                        )
                        outbox.put(CloseSocket(status.WS_1008_POLICY_VIOLATION, SESSION_REFUSED))
                        return _CLOSING
                    case RateLimited(wait):
                        reply_error(
                            ErrorCode.RATE_LIMITED,
                            f"Too many messages: wait {wait} s and send it again",
                            retry_after=wait,
                            client_id=client_id,
                        )
                    case Queued(message, workers_alive) if not workers_alive:
                        # Only to this socket, after the message's ack.
                        notice = NoticeEvent(
                            code=NoticeCode.QUEUED, reply_to=message.id, detail=QUEUED
                        )
                        outbox.put_after_ack(message.id, dump_event(notice))
                # The ack reaches every socket of the session through Pub/Sub, in order with
                # the reply events that follow it.
