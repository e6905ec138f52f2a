"""Chat over HTTP (API v1): `POST /v1/chat` answers with the reply, `POST /v1/chat/stream`
streams the socket's events as Server-Sent Events. docs/protocol.md "API v1" is the contract;
server/exchange.py is the path a message takes.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from core.models import (
    AckEvent,
    ChatDone,
    ChatReply,
    ConversationEvent,
    DeltaEvent,
    ErrorCode,
    ErrorEvent,
    Message,
    MessageEvent,
    NoticeEvent,
)
from server.api.auth import OPTIONAL_CREDENTIAL, Caller, CallerDep
from server.api.deps import Services, ServicesDep
from server.api.guards import client_address
from server.api.schema import (
    CLIENT_ID_PATTERN,
    MESSAGE_PATTERN,
    UUID4_PATTERN,
    answer,
    described,
    event_stream_schema,
)
from server.event_stream import EventStream
from server.exchange import STATUS, ChatRefused, Exchange, open_exchange
from server.frames import MAX_CLIENT_ID_CHARS

router = APIRouter(prefix="/v1", tags=["chat"])

TIMED_OUT = "No reply within {seconds:g} s; it is still stored in the conversation when it comes"


class ChatRequest(BaseModel):
    """One message for the conversation (a new one without `conversation_id`)."""

    message: str = Field(
        description="the text: trimmed; at most MAX_MESSAGE_CHARS (4000) characters and "
        "MAX_MESSAGE_BYTES (16384) UTF-8 bytes (413 over), no control characters but tab and "
        "line ends (400)",
        json_schema_extra=described(pattern=MESSAGE_PATTERN),
    )
    conversation_id: str | None = Field(
        default=None,
        description="the conversation (its token); left out: a new conversation (201)",
        json_schema_extra=described(pattern=UUID4_PATTERN),
    )
    client_id: str | None = Field(
        default=None,
        description="the client's own id for the message: a retry with the same one is not "
        "stored again and gets the same reply",
        json_schema_extra=described(
            pattern=CLIENT_ID_PATTERN, minLength=1, maxLength=MAX_CLIENT_ID_CHARS
        ),
    )


class StreamToken(DeltaEvent):
    """A token event on the stream: the socket's, with its delta also as `token`."""

    token: str


StreamEvent = (
    AckEvent | StreamToken | MessageEvent | ErrorEvent | NoticeEvent | ConversationEvent | ChatDone
)


class ChatError(BaseModel):
    """Why a message got no reply: the socket's error code, and the ids once it was stored."""

    detail: str
    code: ErrorCode | None = None
    retry_after: int | None = None
    conversation_id: str | None = None
    message_id: str | None = None


def _json_only(entry: dict[str, Any]) -> dict[str, Any]:
    """A refusal of the stream route: JSON, not the route's text/event-stream."""
    model: type[BaseModel] = entry["model"]
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    rest = {key: value for key, value in entry.items() if key != "model"}
    return {**rest, "content": {"application/json": {"schema": schema}}}


def _status(code: ErrorCode) -> int:
    return STATUS.get(code, 502)


REFUSALS: dict[int | str, Any] = {
    400: answer(ChatError, "bad_request: an empty message, a control character, a bad client_id"),
    401: answer(ChatError, "A credential that opens nothing (an unknown or revoked API key)"),
    404: answer(ChatError, "Conversation not found (or not the caller's)"),
    409: answer(ChatError, "The conversation was reset before the reply came"),
    413: answer(ChatError, "too_large: over MAX_MESSAGE_CHARS or MAX_MESSAGE_BYTES"),
    429: answer(ChatError, "rate_limited or backlog_full; nothing was stored", retry_after=True),
    502: answer(ChatError, "model_error: the model refused or broke off (the error is stored)"),
    503: answer(
        ChatError,
        "model_unavailable (stored), or Redis unreachable (nothing stored)",
        retry_after=True,
    ),
    504: answer(ChatError, "timeout: the model's, or no reply within HTTP_REPLY_TIMEOUT_SECONDS"),
}


@router.post(
    "/chat",
    response_model=ChatReply,
    response_model_exclude_none=True,
    responses={
        201: answer(ChatReply, "The reply, in a conversation this call created"),
        **REFUSALS,
    },
    # No credential: a new anonymous conversation (an existing one needs its key or token).
    openapi_extra=OPTIONAL_CREDENTIAL,
)
async def chat(
    body: ChatRequest, request: Request, caller: CallerDep, services: ServicesDep
) -> JSONResponse:
    """Store and queue the message like the socket does, wait for its reply (up to
    HTTP_REPLY_TIMEOUT_SECONDS), and answer it: 201 when this call created the conversation."""
    try:
        exchange = await _open(body, request, caller, services)
    except ChatRefused as refused:
        return refusal(refused)
    try:
        timeout = services.settings.http_reply_timeout_seconds
        try:
            final = await exchange.reply(time.monotonic() + timeout)
        except TimeoutError:
            return refusal(exchange_refused(exchange, 504, TIMED_OUT.format(seconds=timeout)))
        except ChatRefused as refused:
            return refusal(refused)
        reply = final if isinstance(final, Message) else None
        event = final if isinstance(final, dict) else {}
        if (reply is not None and reply.error is not None) or event.get("type") == "error":
            code = ErrorCode(reply.error.code if reply and reply.error else event["code"])
            detail = reply.error.detail if reply and reply.error else str(event["detail"])
            return refusal(exchange_refused(exchange, _status(code), detail, code))
        answer_ = ChatReply(
            response=reply.msg if reply else event["msg"],
            conversation_id=exchange.token,
            message_id=exchange.message_id,
            reply_id=reply.id if reply else event["id"],
            tokens_used=reply.tokens_used if reply else event.get("tokens_used"),
            stopped=reply.stopped if reply else event.get("stopped"),
        )
        return JSONResponse(
            answer_.model_dump(mode="json", exclude_none=True),
            status_code=201 if exchange.created else 200,
        )
    finally:
        await exchange.aclose()


@router.post(
    "/chat/stream",
    response_class=EventStream,
    response_model=None,
    status_code=200,
    responses={
        200: {
            "description": "Server-Sent Events: each `data` is the socket's event JSON (token "
            'events also carry `"token"`), then `{"done": true, ...}` (docs/protocol.md)',
            "content": {"text/event-stream": {"schema": event_stream_schema(StreamEvent)}},
        },
        **{status: _json_only(entry) for status, entry in REFUSALS.items() if status != 504},
    },
    openapi_extra=OPTIONAL_CREDENTIAL,
)
async def chat_stream(
    body: ChatRequest, request: Request, caller: CallerDep, services: ServicesDep
) -> EventStream | JSONResponse:
    """Like POST /v1/chat, with the reply streamed as it is generated. A refusal before the
    message is stored is an HTTP status; after it, the stream carries the error event."""
    try:
        exchange = await _open(body, request, caller, services)
    except ChatRefused as refused:
        return refusal(refused)
    return EventStream(exchange, services.settings)


async def _open(
    body: ChatRequest, request: Request, caller: Caller, services: Services
) -> Exchange:
    """Both routes' first step: the message stored and queued, its reply awaited."""
    return await open_exchange(
        services,
        caller,
        client_address(request),
        body.message,
        body.conversation_id,
        body.client_id,
    )


def exchange_refused(
    exchange: Exchange, status: int, detail: str, code: ErrorCode | None = None
) -> ChatRefused:
    return ChatRefused(
        status,
        detail,
        code or ErrorCode.TIMEOUT,
        conversation_id=exchange.token,
        message_id=exchange.message_id,
    )


def refusal(refused: ChatRefused) -> JSONResponse:
    return JSONResponse(refused.body(), status_code=refused.status, headers=refused.headers())
