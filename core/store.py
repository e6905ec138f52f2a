"""The session store: every read and write of session documents, streams and events.

Server and worker both go through this class, so the document shape, the atomic scripts and
the key names live in one place.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from pydantic import TypeAdapter
from redis.asyncio import Redis

from core.config import Settings
from core.keys import Keys
from core.models import (
    AckEvent,
    ErrorEvent,
    Message,
    MessageEvent,
    Session,
    Source,
    TokenEvent,
    dump_event,
    is_uuid4,
    new_id,
    utcnow,
)
from core.redis import load_script

logger = logging.getLogger(__name__)

# JSON.GET with a JSONPath answers a list of matches: here, one list of messages. Validated
# straight from the JSON text by pydantic-core (about twice as fast as json.loads followed by
# one model_validate per message, and the worker does this for every message it answers).
_MESSAGE_MATCHES: TypeAdapter[list[list[Message]]] = TypeAdapter(list[list[Message]])


class ReplyOutcome(Enum):
    STORED = 1
    ALREADY_ANSWERED = 0
    LOCK_LOST = -1
    SESSION_GONE = -2


@dataclass(frozen=True, slots=True)
class Queued:
    """A message stored, queued and acknowledged."""

    message: Message
    # False when no worker has sent a heartbeat within the lease: the message waits.
    workers_alive: bool


@dataclass(frozen=True, slots=True)
class RateLimited:
    """Refused by a rate limit; nothing was written."""

    retry_after: int  # whole seconds, >= 1


@dataclass(frozen=True, slots=True)
class BacklogFull:
    """Refused: the session has `limit` messages waiting for a reply; nothing was written."""

    limit: int


def retry_after_seconds(wait_ms: int) -> int:
    return max(1, math.ceil(wait_ms / 1000))


class SessionStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self._settings = settings
        self._ttl = settings.session_ttl_seconds
        self._maxlen = settings.stream_maxlen
        self._history_cap = settings.max_history_messages
        self._add_human = redis.register_script(
            load_script(
                "lib_clock.lua", "lib_gcra.lua", "lib_history_cap.lua", "add_human_message.lua"
            )
        )
        self._add_reply = redis.register_script(load_script("lib_history_cap.lua", "add_reply.lua"))
        self._rate_limit = redis.register_script(
            load_script("lib_clock.lua", "lib_gcra.lua", "rate_limit.lua")
        )

    # --- Sessions ----------------------------------------------------------------------------

    async def create(self, name: str) -> Session:
        session = Session(token=new_id(), name=name, session_start=utcnow())
        key = self.keys.session(session.token)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.json().set(key, "$", session.model_dump(mode="json"))
            pipe.expire(key, self._ttl)
            await pipe.execute()
        return session

    async def get(self, token: str) -> Session | None:
        """The whole session, renewing its TTL (reading it means the user is active)."""
        if not is_uuid4(token):
            return None
        key = self.keys.session(token)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.json().get(key)
            pipe.expire(key, self._ttl)
            document, _ = await pipe.execute()
        return None if document is None else Session.model_validate(document)

    async def touch(self, token: str) -> bool:
        """Renew the TTL; False when the session does not exist."""
        return is_uuid4(token) and bool(
            await self.redis.expire(self.keys.session(token), self._ttl)
        )

    async def messages_and_stop(self, token: str) -> tuple[list[Message] | None, datetime | None]:
        """The session's messages and its latest stop time, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("JSON.GET", self.keys.session(token), "$.messages")
            pipe.get(self.keys.stop(token))
            raw, stopped = await pipe.execute()
        return _parse_messages(raw), _stop_time(stopped)

    # --- Messages ----------------------------------------------------------------------------

    async def queue_message(
        self,
        token: str,
        text: str,
        client_id: str | None = None,
        *,
        address: str | None = None,
        rate_limited: bool = True,
    ) -> Queued | RateLimited | None:
        """Check the session's and the address's rate limits, then store the message, queue it
        for a worker and announce it (its `ack`), trimming the history to its cap: one atomic
        step and one round trip. Returns None when the session has expired."""
        settings = self._settings
        message = Message(source=Source.HUMAN, msg=text)
        ack = AckEvent(
            id=message.id, msg=message.msg, timestamp=message.timestamp, client_id=client_id
        )
        per_session = settings.rate_limit_session_messages if rate_limited else 0
        per_address = settings.rate_limit_address_messages if rate_limited and address else 0
        result: Any = await self._add_human(
            keys=[
                self.keys.session(token),
                self.keys.requests,
                self.keys.rate("msg-session", token),
                self.keys.rate("msg-address", address or "-"),
                self.keys.workers_alive,
            ],
            args=[
                message.model_dump_json(exclude_none=True),
                self._ttl,
                self._maxlen,
                token,
                message.id,
                self.keys.events(token),
                dump_event(ack),
                per_session,
                per_address,
                settings.rate_limit_window_seconds * 1000,
                self._history_cap,
                int(settings.worker_lease_seconds * 1000),
            ],
        )
        status = int(result[0])
        if status == 0:
            return None
        if status == 2:
            return RateLimited(retry_after_seconds(int(result[1])))
        if status == 3:  # a retry of a call that had stored it
            return Queued(message, workers_alive=True)
        return Queued(message, workers_alive=int(result[2]) > 0)

    async def check_rate(self, kind: str, subject: str, limit: int, period_seconds: int) -> int:
        """Count one request of `kind` by `subject` against `limit` per period (one atomic
        step). Returns 0 when allowed, else the whole seconds to wait (>= 1)."""
        if limit <= 0:
            return 0
        wait: Any = await self._rate_limit(
            keys=[self.keys.rate(kind, subject)], args=[limit, period_seconds * 1000]
        )
        return 0 if int(wait) <= 0 else retry_after_seconds(int(wait))

    async def add_reply(
        self, token: str, reply: Message, event: MessageEvent | ErrorEvent, lock_owner: str
    ) -> ReplyOutcome:
        """Append a bot reply unless one exists already, and only while holding the lock.

        Once the message has its answer (this one, or one stored before), its generation-attempt
        counter (worker/responder.py) is deleted in the same step."""
        assert reply.reply_to is not None and is_uuid4(reply.reply_to)
        result = await self._add_reply(
            keys=[
                self.keys.session(token),
                self.keys.lock(token),
                self.keys.attempts(reply.reply_to),
            ],
            args=[
                lock_owner,
                reply.reply_to,
                reply.model_dump_json(exclude_none=True),
                self._ttl,
                self.keys.events(token),
                dump_event(event),
                self._history_cap,
            ],
        )
        return ReplyOutcome(int(result))

    async def publish_token(self, token: str, event: TokenEvent) -> None:
        await self.redis.publish(self.keys.events(token), dump_event(event))

    # --- Stop requests -----------------------------------------------------------------------

    async def request_stop(self, token: str) -> None:
        """Ask whichever worker generates for this session to stop; remembered for late starters."""
        now_us = int(utcnow().timestamp() * 1_000_000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.stop(token), now_us, ex=self._ttl)
            pipe.publish(self.keys.control, json.dumps({"type": "stop", "token": token}))
            await pipe.execute()


def _parse_messages(raw: object) -> list[Message] | None:
    if raw is None:
        return None
    if isinstance(raw, str | bytes):
        matches = _MESSAGE_MATCHES.validate_json(raw)
    else:  # the client decoded it already (redis-py's JSON callbacks, once `.json()` was used)
        matches = _MESSAGE_MATCHES.validate_python(raw)
    return matches[0] if matches else None


def _stop_time(value: str | bytes | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(int(value) / 1_000_000, UTC)
