"""The chat socket: messages in, events out.

Every frame the server sends goes through the socket's `Outbox` and one sender task, so frames
from Redis and the server's own error replies never interleave mid-send. The sender bounds
each send by SOCKET_SEND_TIMEOUT_SECONDS: a client that stops reading is closed (1013), or
dropped when even the close cannot be written, and its handler returns either way.

Two query parameters shape what a socket gets (docs/protocol.md): `history=1` (the session
document first) and `format=text` (plain-text replies and errors only, server/plain_text.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect, status
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.websockets import WebSocketState

from core.metrics import MESSAGES_RECEIVED, SOCKETS_OPEN
from core.models import (
    CommandEvent,
    ErrorCode,
    ErrorEvent,
    HistoryEvent,
    NoticeCode,
    NoticeEvent,
    Session,
    dump_event,
    short,
)
from core.store import BacklogFull, Queued, RateLimited
from server.api.deps import Services, ServicesDep
from server.api.errors import REDIS_UNAVAILABLE, unavailable_response
from server.api.guards import client_address, origin_allowed
from server.frames import (
    HELP,
    ChatMessage,
    FrameError,
    SlashCommand,
    StopGeneration,
    parse_frame,
    quoted,
)
from server.hub import CloseSocket, Outbox, OutboxOverflow
from server.plain_text import as_plain_text, transcript
from server.sockets import TooManySockets

logger = logging.getLogger(__name__)
router = APIRouter(tags=["chat"])

SESSION_REFUSED = "Session not authenticated or expired token"
BINARY_REFUSED = "Binary frames are not supported: send the message as a text frame"
UNAVAILABLE = "The service is briefly unavailable; nothing was stored. Send it again."
ORIGIN_REFUSED = "Origin not allowed"
TOO_SLOW = "Too slow; reconnect"
FORMATS = ("json", "text")
FLAGS = {"1": True, "true": True, "0": False, "false": False}
STOP_REQUESTED = "Stop requested: the reply being generated, if any, ends now"
QUEUED = (
    "No worker is running right now; your message is queued and will be answered when one starts."
)
_CLOSING = object()  # returned by the receiver when the server is closing the socket


@dataclass(slots=True)
class _Socket:
    """One open chat socket and what its frame handlers need."""

    websocket: WebSocket
    token: str
    address: str
    services: Services
    outbox: Outbox
    receiver: asyncio.Task[None]  # the handler's task, which receives the client's frames
    plain_text: bool = False  # `?format=text`: only replies and errors, as plain text
    gave_up: bool = False  # set by the sender when it had to end the receiving (_give_up)

    def reply_error(
        self,
        code: ErrorCode,
        detail: str,
        retry_after: int | None = None,
        client_id: str | None = None,
    ) -> None:
        """An error for this socket only (not the session's other sockets)."""
        event = ErrorEvent(code=code, detail=detail, retry_after=retry_after, client_id=client_id)
        self.outbox.put(dump_event(event))


@dataclass(frozen=True, slots=True)
class _Options:
    """What the query asked for besides the token."""

    history: bool = False
    plain_text: bool = False


@router.websocket("/chat")
async def chat(
    websocket: WebSocket,
    services: ServicesDep,
    token: str | None = None,
    history: str | None = None,
    text_format: Annotated[str | None, Query(alias="format")] = None,
) -> None:
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, websocket.headers.get("host"), services.settings.socket_origins):
        logger.info("socket refused: origin %r is not allowed", origin)
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=ORIGIN_REFUSED)
        return
    options = _options(history, text_format)
    if isinstance(options, str):
        await _refuse_bad_query(websocket, options)
        return
    if token is None:
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=SESSION_REFUSED)
        return
    address = client_address(websocket)
    try:
        if not await services.store.touch(token):
            await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=SESSION_REFUSED)
            return
        socket_id = await services.sockets.open(token, address)
    except (RedisError, OSError) as exc:
        logger.warning("socket refused: Redis is unreachable (%s)", exc)
        await _refuse_while_unavailable(websocket)
        return
    except TooManySockets as refused:
        await _refuse_one_too_many(websocket, token, refused)
        return
    try:
        await _serve(websocket, token, address, services, options)
    except (RedisError, OSError, TimeoutError) as exc:
        if websocket.client_state is not WebSocketState.CONNECTING:
            raise
        # Subscribing to the session's events failed, before the handshake completed.
        logger.warning("socket refused: could not subscribe to its events (%s)", exc)
        await _refuse_while_unavailable(websocket)
    finally:
        await services.sockets.close(socket_id)


def _options(history: str | None, text_format: str | None) -> _Options | str:
    """The socket's options, or why the query is refused."""
    history, text_format = history or "0", text_format or "json"
    flag = FLAGS.get(history.lower())
    if flag is None:
        return f"history must be 1 or 0 (true or false), not {quoted(history)}"
    if text_format not in FORMATS:
        return f"format must be json or text, not {quoted(text_format)}"
    return _Options(history=flag, plain_text=text_format == "text")


async def _refuse_bad_query(websocket: WebSocket, reason: str) -> None:
    """A query the socket cannot honour: refused in the handshake with HTTP 400 and the reason
    as `{"detail": ...}` (readable in Postman and any client's handshake error), or, on a
    server without the denial-response extension, a close with 1008 and the reason."""
    logger.info("socket refused: %s", reason)
    try:
        await websocket.send_denial_response(
            JSONResponse({"detail": reason}, status_code=status.HTTP_400_BAD_REQUEST)
        )
    except RuntimeError:
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=reason)


async def _refuse_while_unavailable(websocket: WebSocket) -> None:
    """Redis is down: refuse the handshake with HTTP 503 and `Retry-After`, the same answer
    as the HTTP routes, so a client can tell it from a refused token (403) and retry.

    uvicorn's websockets-sansio protocol then logs "ASGI callable returned without completing
    handshake" although the 503 went out (upstream: Kludex/uvicorn#3138)."""
    try:
        await websocket.send_denial_response(unavailable_response())
    except RuntimeError:  # a server without the denial-response extension: plain refusal
        await websocket.close(code=status.WS_1011_INTERNAL_ERROR, reason=REDIS_UNAVAILABLE)


async def _refuse_one_too_many(websocket: WebSocket, token: str, refused: TooManySockets) -> None:
    """Accepted so that the client can read why, then closed with 1008."""
    logger.info("socket refused for session %s: %s", short(token), refused.reason)
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await websocket.send_text(
            dump_event(ErrorEvent(code=ErrorCode.TOO_MANY_CONNECTIONS, detail=refused.detail))
        )
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=refused.reason)


async def _serve(
    websocket: WebSocket, token: str, address: str, services: Services, options: _Options
) -> None:
    # Subscribed before the handshake completes: a client whose socket is open receives every
    # event of its session from then on (a second tab included).
    async with services.hub.subscribe(token) as outbox:
        first = None
        if options.history:
            first = await _history_frame(services, token, options.plain_text)
            if first is None:  # the session ended since it was checked
                await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=SESSION_REFUSED)
                return
        await websocket.accept()
        SOCKETS_OPEN.inc()
        logger.info("socket opened for session %s", short(token))
        receiver = asyncio.current_task()
        assert receiver is not None
        socket = _Socket(websocket, token, address, services, outbox, receiver, options.plain_text)
        # The sender is a task; this handler's own task receives. (One task fewer per socket
        # than a task for each: about 1 KiB of an idle socket's cost, docs/benchmarks.md.)
        # If the sender closes the socket first (a resync, a slow client), the close, or the
        # connection's end, ends the receiving too.
        sender = asyncio.create_task(_send_events(socket, first))
        received: object = None
        try:
            received = await _receive_frames(socket)
            if received is _CLOSING:
                # The server is closing: let the sender deliver what is queued, then the close.
                timeout = services.settings.socket_send_timeout_seconds
                await asyncio.wait({sender}, timeout=3 * timeout)
        except (WebSocketDisconnect, RuntimeError):  # the connection was already gone
            pass
        except asyncio.CancelledError:
            if not socket.gave_up:
                raise
            receiver.uncancel()  # the sender's doing (see _give_up): this socket is done
        finally:
            SOCKETS_OPEN.dec()
            if not sender.done():
                sender.cancel()
                if received is _CLOSING:
                    _abort(websocket)  # the close never went out
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await sender
    logger.info("socket closed for session %s", short(token))


async def _history_frame(services: Services, token: str, plain_text: bool) -> str | None:
    """`?history=1`'s first frame: the session document, read after the socket subscribed to
    the session's events (and before they are sent), so nothing falls between the two: every
    change is in the document, or in an event after it, or both (an ack of a message the
    document holds already; clients de-duplicate by id, as after any reconnect). None when the
    session is gone. A Redis failure here refuses the handshake like any other (503)."""
    session: Session | None = await services.store.get(token)
    if session is None:
        return None
    return transcript(session) if plain_text else dump_event(HistoryEvent(session=session))


async def _send_events(socket: _Socket, first: str | None = None) -> None:
    """Send `first`, then the outbox's frames in order until a close; each send may take
    SOCKET_SEND_TIMEOUT_SECONDS. A `?format=text` socket gets them as plain text, or not at
    all (server/plain_text.py)."""
    send_timeout = socket.services.settings.socket_send_timeout_seconds
    loop = asyncio.get_running_loop()
    try:
        # One deadline for the loop, armed for each send and disarmed while the outbox is
        # waited on: a context per frame cost 5.3 us, a reschedule pair 3.2 (four frames per
        # chat message).
        async with asyncio.timeout(None) as deadline:
            if first is not None:
                deadline.reschedule(loop.time() + send_timeout)
                await socket.websocket.send_text(first)
                deadline.reschedule(None)
            while True:
                frame = await socket.outbox.get()
                if isinstance(frame, CloseSocket):
                    await _close(socket, frame.code, frame.reason)
                    return
                text = as_plain_text(frame) if socket.plain_text else frame
                if text is None:
                    continue
                deadline.reschedule(loop.time() + send_timeout)
                await socket.websocket.send_text(text)
                deadline.reschedule(None)
    except OutboxOverflow:
        logger.warning("socket's outbox is full (it reads too slowly); closing it to resync")
        await _close(socket, status.WS_1013_TRY_AGAIN_LATER, TOO_SLOW)
    except TimeoutError:
        logger.warning("socket took a frame for over %g s; closing it to resync", send_timeout)
        await _close(socket, status.WS_1013_TRY_AGAIN_LATER, TOO_SLOW)


async def _close(socket: _Socket, code: int, reason: str) -> None:
    """Close with `code`; when even the close frame cannot be written in time (the client
    reads nothing and every buffer is full), drop the connection."""
    try:
        async with asyncio.timeout(socket.services.settings.socket_send_timeout_seconds):
            await socket.websocket.close(code=code, reason=reason)
    except TimeoutError:
        logger.warning("socket could not take its close frame either; aborting the connection")
        if not _abort(socket.websocket):
            _give_up(socket)


def _give_up(socket: _Socket) -> None:
    """End the handler of a socket whose connection cannot be dropped: its receive would wait
    for a client that sends nothing, as no disconnect can come now. Cancelling the receiving
    task costs nothing per socket, unlike a timeout scope around every receive."""
    socket.gave_up = True
    socket.receiver.cancel()


def _abort(websocket: WebSocket) -> bool:
    """Drop the TCP connection now, unsent data and all; False when it cannot be reached.

    ASGI has no abort, and uvicorn 0.54's websockets-sansio implementation (the one "auto"
    picks here; wsproto's is alike) never drops a connection with unsent data: its send waits
    for the write buffer to drain before anything, a close included, and its own closes (after
    the close handshake's timeout, or on a ping timeout) are a graceful `transport.close()`
    that waits for the same buffer, which a client that reads nothing never drains. So this
    reaches the uvicorn protocol whose bound method is the socket's `receive` and aborts its
    transport; uvicorn then sees the connection lost and ends the receive. A middleware that
    wraps `receive` hides it: then the handler still returns (`_give_up`), but the connection
    lingers until the client goes."""
    protocol = getattr(websocket._receive, "__self__", None)
    transport = getattr(protocol, "transport", None)
    if isinstance(transport, asyncio.Transport):
        transport.abort()
        return True
    logger.warning("cannot abort this server's connection: it is left to the client")
    return False


async def _receive_frames(socket: _Socket) -> object:
    """Handle the client's frames until it disconnects (None) or the server closes (_CLOSING)."""
    while True:
        frame = await socket.websocket.receive()
        if frame["type"] == "websocket.disconnect":
            return None
        text = frame.get("text")
        if text is None:
            socket.reply_error(ErrorCode.BAD_REQUEST, BINARY_REFUSED)
        elif await _handle_frame(socket, text) is _CLOSING:
            return _CLOSING


async def _handle_frame(socket: _Socket, text: str) -> object:
    settings = socket.services.settings
    match parse_frame(text, settings.max_message_chars, settings.max_message_bytes):
        case FrameError(code, detail, client_id):
            socket.reply_error(code, detail, client_id=client_id)
        case StopGeneration():
            await _request_stop(socket)
        case SlashCommand(name, argument, client_id):
            return await _run_command(socket, name, argument, client_id)
        case ChatMessage(message_text, client_id):
            return await _store_message(socket, message_text, client_id)
    return None


async def _run_command(socket: _Socket, name: str, argument: str, client_id: str | None) -> object:
    """A slash command: done, and answered to this socket only with a `command` event (the
    session's sockets also get the `conversation` event the store publishes for /reset and
    /title). Never stored as a chat message, so it needs no worker and no ack."""
    if name == "stop":
        if await _request_stop(socket, client_id):
            _answer(socket, CommandEvent(command=name, detail=STOP_REQUESTED, client_id=client_id))
        return None
    if name == "help":
        _answer(socket, CommandEvent(command=name, detail=HELP, client_id=client_id))
        return None
    return await _change_conversation(socket, name, argument, client_id)


def _answer(socket: _Socket, event: CommandEvent) -> None:
    socket.outbox.put(dump_event(event))


async def _change_conversation(
    socket: _Socket, name: str, argument: str, client_id: str | None
) -> object:
    """/reset and /title: a change to the session document, through the store."""
    store = socket.services.store
    try:
        if name == "reset":
            done = await store.reset(socket.token)
            detail, title = "History cleared", None
        else:
            done = await store.set_title(socket.token, argument)
            detail, title = f"Title set to {argument!r}", argument
    except RedisError as exc:
        _log_refusal(f"could not run /{name}", socket.token, exc)
        socket.reply_error(ErrorCode.SERVICE_UNAVAILABLE, UNAVAILABLE, client_id=client_id)
        return None
    if not done:
        return _session_gone(socket, client_id)
    _answer(socket, CommandEvent(command=name, detail=detail, title=title, client_id=client_id))
    return None


def _session_gone(socket: _Socket, client_id: str | None) -> object:
    socket.reply_error(
        ErrorCode.SESSION_EXPIRED, "Session expired or does not exist", client_id=client_id
    )
    socket.outbox.put(CloseSocket(status.WS_1008_POLICY_VIOLATION, SESSION_REFUSED))
    return _CLOSING


async def _request_stop(socket: _Socket, client_id: str | None = None) -> bool:
    """Pass a stop on to the workers, within the session's stop rate limit; False (and an
    error to this socket) when it was not passed on."""
    settings, store = socket.services.settings, socket.services.store
    try:
        wait = await store.check_rate(
            "stop-session",
            socket.token,
            settings.rate_limit_stop_requests,
            settings.rate_limit_window_seconds,
        )
        if wait:
            detail = f"Too many stop requests: wait {wait} s and send it again"
            socket.reply_error(
                ErrorCode.RATE_LIMITED, detail, retry_after=wait, client_id=client_id
            )
            return False
        await store.request_stop(socket.token)
    except RedisError as exc:
        _log_refusal("could not pass on a stop", socket.token, exc)
        socket.reply_error(ErrorCode.SERVICE_UNAVAILABLE, UNAVAILABLE, client_id=client_id)
        return False
    return True


def _log_refusal(what: str, token: str, exc: RedisError) -> None:
    """One line, no traceback: Redis refusing (OOM, READONLY, MISCONF, a lost connection) is a
    state of the service, not a bug here, and under load a traceback per message would bury it.
    """
    logger.warning("%s for session %s: Redis: %s: %s", what, short(token), type(exc).__name__, exc)


async def _store_message(socket: _Socket, text: str, client_id: str | None) -> object:
    """Store, queue and acknowledge a chat message (one step in Redis), or say why not."""
    try:
        stored = await socket.services.store.queue_message(
            socket.token, text, client_id, address=socket.address
        )
    except RedisError as exc:
        _log_refusal("could not queue a message", socket.token, exc)
        socket.reply_error(ErrorCode.SERVICE_UNAVAILABLE, UNAVAILABLE, client_id=client_id)
        return None
    # The ack reaches every socket of the session through Pub/Sub, in order with the reply
    # events that follow it; only refusals and the notice are this socket's own.
    if isinstance(stored, Queued):
        MESSAGES_RECEIVED.inc()
    match stored:
        case None:
            return _session_gone(socket, client_id)
        case RateLimited(wait):
            detail = f"Too many messages: wait {wait} s and send it again"
            socket.reply_error(
                ErrorCode.RATE_LIMITED, detail, retry_after=wait, client_id=client_id
            )
        case BacklogFull(limit):
            detail = (
                f"This session already has {limit} messages waiting for a reply; wait for an "
                "answer and send it again"
            )
            socket.reply_error(ErrorCode.BACKLOG_FULL, detail, client_id=client_id)
        case Queued(message, workers_alive) if not workers_alive:
            notice = NoticeEvent(code=NoticeCode.QUEUED, reply_to=message.id, detail=QUEUED)
            socket.outbox.put_after_ack(message.id, dump_event(notice))
    return None
