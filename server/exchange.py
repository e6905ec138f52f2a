"""One chat message over HTTP and its reply (`POST /v1/chat` and `/v1/chat/stream`).

The message takes the socket's path: the frame rules of server/frames.py, then
`store.queue_message` (the same rate limits, backlog cap and exactly-once storing). The
session's events are subscribed *before* the message is queued, as the socket does, so its
reply cannot be published before anyone listens. A `client_id` makes the message id
deterministic (`client_message_id`), so a retry is not stored again (add_human_message.lua
refuses an id it holds) and waits for, or finds in the history, the first call's reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from core.models import (
    ConversationChange,
    ErrorCode,
    Message,
    client_message_id,
    new_id,
    reply_event,
    short,
)
from core.store import BacklogFull, Queued, RateLimited
from server.api.auth import CONVERSATION_MISSING, Caller, conversation_for
from server.api.deps import Services
from server.api.errors import REDIS_UNAVAILABLE
from server.frames import FrameError, parse_message
from server.hub import CloseSocket, Outbox, OutboxOverflow

logger = logging.getLogger(__name__)

ANONYMOUS_NAME = "Anonymous"
BACKLOG_RETRY_SECONDS = 1
HISTORY_POLL_SECONDS = 0.25
FINAL = ("message", "error")
STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BACKLOG_FULL: 429,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.MODEL_UNAVAILABLE: 503,
    ErrorCode.MODEL_ERROR: 502,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.SESSION_EXPIRED: 404,
}
RESET = "The conversation was reset before this message was answered; it is gone"


class ChatRefused(Exception):
    """The HTTP answer to a message that got no reply: a status and the socket's error."""

    def __init__(
        self,
        status: int,
        detail: str,
        code: ErrorCode | None = None,
        *,
        retry_after: int | None = None,
        conversation_id: str | None = None,
        message_id: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code
        self.retry_after = retry_after
        self.conversation_id = conversation_id
        self.message_id = message_id

    def body(self) -> dict[str, Any]:
        values = {
            "detail": self.detail,
            "code": self.code,
            "retry_after": self.retry_after,
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
        }
        return {name: value for name, value in values.items() if value is not None}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


@dataclass
class Exchange:
    """A stored message whose session's events this process receives (`outbox`) until
    `aclose`. `answered` is its reply when it was in the history already (a retry)."""

    services: Services
    token: str
    message: Message
    created: bool
    outbox: Outbox
    stack: contextlib.AsyncExitStack
    workers_alive: bool = True
    answered: Message | None = None
    missed: bool = field(default=False)  # events were lost (overflow, resync): read history

    @property
    def message_id(self) -> str:
        return self.message.id

    async def aclose(self) -> None:
        await self.stack.aclose()

    async def events(self, idle_seconds: float) -> AsyncIterator[dict[str, Any] | None]:
        """This message's events (its ack, tokens, notices, the conversation's changes) up to
        and with its final one; None every `idle_seconds` without one (a heartbeat's turn).
        Ends without a final event when events were missed (`missed`: see the history)."""
        if self.answered is not None:
            yield json.loads(_dump(reply_event(self.answered)))
            return
        while True:
            try:
                frame = await asyncio.wait_for(self.outbox.get(), idle_seconds)
            except TimeoutError:
                yield None
                continue
            except OutboxOverflow:
                self.missed = True
                return
            if isinstance(frame, CloseSocket):
                self.missed = True
                return
            event = json.loads(frame)
            if not self._concerns(event):
                continue
            yield event
            if event.get("type") in FINAL or ends_conversation(event):
                return

    def _concerns(self, event: dict[str, Any]) -> bool:
        kind = event.get("type")
        if kind == "ack":
            return bool(event.get("id") == self.message_id)
        if kind == "conversation":
            return True
        return bool(event.get("reply_to") == self.message_id)

    async def stored_reply(self) -> Message | None:
        return await self.services.store.reply_to(self.token, self.message_id)

    async def reply(self, deadline: float) -> Message | dict[str, Any]:
        """The final event (a dict), or the stored reply when events were missed; raises
        ChatRefused when the conversation went away, TimeoutError after `deadline`."""
        if self.answered is not None:
            return self.answered
        remaining = deadline - time.monotonic()
        async for event in self.events(max(remaining, 0.01)):
            if event is not None and event.get("type") in FINAL:
                return event
            if event is not None and ends_conversation(event):
                raise self.gone(event)
            if time.monotonic() >= deadline:
                raise TimeoutError
        while time.monotonic() < deadline:  # events were missed: the history has the answer
            stored = await self.stored_reply()
            if stored is not None:
                return stored
            await asyncio.sleep(HISTORY_POLL_SECONDS)
        raise TimeoutError

    def gone(self, event: dict[str, Any]) -> ChatRefused:
        if event.get("change") == ConversationChange.DELETED:
            return ChatRefused(404, CONVERSATION_MISSING)
        return ChatRefused(409, RESET, conversation_id=self.token, message_id=self.message_id)


def ends_conversation(event: dict[str, Any]) -> bool:
    """A delete or a reset: the message is gone and will not be answered."""
    return event.get("type") == "conversation" and event.get("change") in (
        ConversationChange.DELETED,
        ConversationChange.RESET,
    )


def _dump(event: Any) -> str:
    return str(event.model_dump_json(exclude_none=True))


async def open_exchange(
    services: Services,
    caller: Caller,
    address: str,
    text: str,
    conversation_id: str | None,
    client_id: str | None,
) -> Exchange:
    """Check the text, find or create the conversation, subscribe to its events, then store
    and queue the message. Raises ChatRefused (nothing stored) or HTTPException (404)."""
    settings = services.settings
    parsed = parse_message(text, client_id, settings.max_message_chars, settings.max_message_bytes)
    if isinstance(parsed, FrameError):
        raise ChatRefused(STATUS[parsed.code], parsed.detail, parsed.code)
    token, created = await _conversation(services, caller, address, conversation_id, client_id)
    stack = contextlib.AsyncExitStack()
    try:
        try:
            outbox = await stack.enter_async_context(services.hub.subscribe(token))
        except (TimeoutError, OSError) as exc:  # Redis did not confirm the subscription
            logger.warning("could not subscribe to session %s: %s", short(token), exc)
            raise ChatRefused(503, REDIS_UNAVAILABLE, retry_after=1) from exc
        message_id = client_message_id(token, client_id) if client_id else None
        stored = await services.store.queue_message(
            token, parsed.text, client_id, address=address, message_id=message_id
        )
        queued = _queued(stored, token)
        exchange = Exchange(
            services, token, queued.message, created, outbox, stack, queued.workers_alive
        )
        if client_id is not None:  # perhaps a retry of a message answered already
            exchange.answered = await exchange.stored_reply()
    except BaseException:
        await stack.aclose()
        raise
    logger.info("http message %s queued for session %s", short(exchange.message_id), short(token))
    return exchange


def _queued(stored: Queued | RateLimited | BacklogFull | None, token: str) -> Queued:
    match stored:
        case None:
            raise ChatRefused(404, CONVERSATION_MISSING)
        case RateLimited(wait):
            raise ChatRefused(
                429,
                f"Too many messages: wait {wait} s and send it again",
                ErrorCode.RATE_LIMITED,
                retry_after=wait,
                conversation_id=token,
            )
        case BacklogFull(limit):
            raise ChatRefused(
                429,
                f"This session already has {limit} messages waiting for a reply; wait for an "
                "answer and send it again",
                ErrorCode.BACKLOG_FULL,
                retry_after=BACKLOG_RETRY_SECONDS,
                conversation_id=token,
            )
    assert isinstance(stored, Queued)
    return stored


async def _conversation(
    services: Services,
    caller: Caller,
    address: str,
    conversation_id: str | None,
    client_id: str | None,
) -> tuple[str, bool]:
    """The conversation's token, and whether this call created it. A new one counts against
    POST /token's per-address limit, as starting a session does. With an API key and a
    client_id, a retry of the call that created one goes to that same conversation."""
    store, settings = services.store, services.settings
    if conversation_id is not None:
        session = await conversation_for(caller, services, conversation_id)
        return session.token, False
    wait = await store.check_rate(
        "http-token",
        address,
        settings.rate_limit_token_requests,
        settings.rate_limit_http_window_seconds,
    )
    if wait:
        raise ChatRefused(
            429,
            f"Too many requests: try again in {wait} s",
            ErrorCode.RATE_LIMITED,
            retry_after=wait,
        )
    user = caller.user
    token = new_id()
    if user is not None and client_id is not None:
        earlier = await store.claim_conversation(user.user_id, client_id, token)
        if earlier is not None and await store.touch(earlier):
            return earlier, True
    session = await store.create(
        user.name if user is not None else ANONYMOUS_NAME,
        user_id=user.user_id if user is not None else None,
        token=token,
    )
    return session.token, True
