"""The session store: every read and write of session documents, streams and events.

Server and worker both go through this class, so the document shape, the atomic scripts and
the key names live in one place.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, cast

from pydantic import TypeAdapter
from redis.exceptions import RedisError

from core.autopipeline import AutoPipeline
from core.config import Settings
from core.conversations import ConversationIndex
from core.keys import Keys
from core.models import (
    AckEvent,
    ConversationChange,
    ConversationEvent,
    DeltaEvent,
    ErrorEvent,
    Message,
    MessageEvent,
    Session,
    Source,
    dump_event,
    is_uuid4,
    new_id,
    title_from_message,
    utcnow,
)
from core.redis import AnyRedis, is_cluster, load_script

logger = logging.getLogger(__name__)

# How long a process trusts that workers are alive (`SessionStore._workers_alive`).
WORKERS_SEEN_SECONDS = 1.0

# JSON.GET with a JSONPath answers a list of matches: `$.messages` one list of messages,
# `$.messages[-N:]` the messages themselves. Validated straight from the JSON text by
# pydantic-core (about twice as fast as json.loads followed by one model_validate per message,
# and the worker does this for every message it answers).
_MESSAGE_MATCHES: TypeAdapter[list[list[Message]]] = TypeAdapter(list[list[Message]])
_MESSAGE_SLICE: TypeAdapter[list[Message]] = TypeAdapter(list[Message])
# begin_turn.lua's window: path -> matches, the messages' and the waiting count's.
_WINDOW: TypeAdapter[dict[str, list[Message] | list[int]]] = TypeAdapter(
    dict[str, list[Message] | list[int]]
)


class ReplyOutcome(Enum):
    STORED = 1
    ALREADY_ANSWERED = 0
    LEASE_LOST = -1
    SESSION_GONE = -2
    # The message was reset away or dropped by the history cap: its reply is not stored.
    QUESTION_GONE = -3


class LeaseBusy(Exception):
    """Another worker holds the session's lease: `recent_messages` took it not, read nothing."""


@dataclass(frozen=True, slots=True)
class Recent:
    """The newest messages of a session and its latest stop time (on Redis's clock)."""

    messages: list[Message]
    stopped_at: datetime | None
    # True when `messages` is the whole history (it had no more than were asked for).
    complete: bool
    # The generation attempts of the message the reader expected to answer, counted as it
    # read (`SessionStore.recent_messages`); None when it counted none.
    attempts: int | None = None
    # The session's messages waiting for a reply (`$.unanswered`), in `messages` or not: a
    # window that holds fewer of them misses some.
    unanswered: int = 0


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
    """Owns every key it writes: session documents, the request stream's entries, rate-limit
    state, stop times and generation-attempt counters (the leases are worker/leases.py's).
    `index` (core/conversations.py) is the per-user index of the sessions an account owns."""

    def __init__(self, redis: AnyRedis, settings: Settings, keys: Keys | None = None) -> None:
        self.redis = redis
        self.keys = keys or Keys.from_settings(settings)
        self._settings = settings
        self._ttl = settings.session_ttl_seconds
        self._history_cap = settings.max_history_messages
        self._add_human = redis.register_script(
            load_script(
                "lib_clock.lua",
                "lib_gcra.lua",
                "lib_unanswered.lua",
                "lib_answered.lua",
                "lib_history_cap.lua",
                "add_human_message.lua",
            )
        )
        self._add_reply = redis.register_script(
            load_script(
                "lib_unanswered.lua", "lib_answered.lua", "lib_history_cap.lua", "add_reply.lua"
            )
        )
        self._begin_turn = redis.register_script(load_script("begin_turn.lua"))
        self._create = redis.register_script(load_script("lib_answered.lua", "create_session.lua"))
        self._rate_limit = redis.register_script(
            load_script("lib_clock.lua", "lib_gcra.lua", "rate_limit.lua")
        )
        self._request_stop = redis.register_script(load_script("lib_clock.lua", "request_stop.lua"))
        self._change = redis.register_script(
            load_script("lib_clock.lua", "lib_answered.lua", "change_conversation.lua")
        )
        self._count_workers = redis.register_script(
            load_script("lib_clock.lua", "count_workers.lua")
        )
        # The hot path's calls (a message, a turn's read, a reply, its pieces) from many
        # sessions at once go to Redis together (core/autopipeline.py).
        self._pipeline = AutoPipeline(redis)
        # When workers were last seen alive (monotonic; see `_workers_alive`).
        self._workers_seen_at: float | None = None
        self.index = ConversationIndex(redis, self.keys)
        # Attempt counts this process could not take back while Redis refused writes: taken
        # back with the next attempt it counts for the same message.
        self._owed_attempts: dict[str, int] = {}

    # --- Sessions ----------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        user_id: str | None = None,
        title: str | None = None,
        token: str | None = None,
    ) -> Session:
        """A new, empty session; owned by `user_id` (and in its index) when given. The title
        stays unset (left out of the document) until one is set or the first message sets it.
        `token` is one reserved by `claim_conversation` (else a new one)."""
        session = Session(
            token=token or new_id(), name=name, session_start=utcnow(), title=title, user_id=user_id
        )
        if user_id is not None:  # index first: see core/conversations.py
            await self.index.add(user_id, session.token, _epoch_ms(session.session_start))
        document = session.model_dump_json(exclude_none=True)
        await self._create(keys=[self.keys.session(session.token)], args=[document, self._ttl])
        return session

    async def get(self, token: str) -> Session | None:
        """The whole session, renewing its TTL (reading it means the user is active)."""
        if not is_uuid4(token):
            return None
        key = self.keys.session(token)
        # Not a transaction: the read and the renewal need not be one step, and redis-py's
        # cluster client cannot read a JSON reply inside one.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.json().get(key)
            pipe.expire(key, self._ttl)
            document, _ = await pipe.execute()
        return None if document is None else Session.model_validate(document)

    async def touch(self, token: str) -> bool:
        """Renew the TTL; False when the session does not exist."""
        return is_uuid4(token) and bool(
            await self.redis.expire(self.keys.session(token), self._ttl)
        )

    async def messages_and_stop(
        self, token: str, newest: int | None = None
    ) -> tuple[list[Message] | None, datetime | None]:
        """The session's messages (only the `newest` ones when given) and its latest stop
        time, in one round trip."""
        path = "$.messages" if newest is None else f"$.messages[-{newest}:]"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("JSON.GET", self.keys.session(token), path)
            pipe.get(self.keys.stop(token))
            raw, stopped = await pipe.execute()
        if newest is None:
            return _parse_messages(raw), _stop_time(stopped)
        return _parse_slice(raw), _stop_time(stopped)

    async def reply_to(self, token: str, message_id: str) -> Message | None:
        """The stored answer to `message_id` (a reply or an error entry), if there is one."""
        if not is_uuid4(message_id):
            return None
        path = f'$.messages[?(@.reply_to=="{message_id}")]'
        raw: Any = await self.redis.json().get(self.keys.session(token), path)
        replies = _parse_slice(raw)
        return replies[0] if replies else None

    async def claim_conversation(self, scope: str, client_id: str, token: str) -> str | None:
        """Reserve `token` as the conversation that the first `POST /v1/chat` with this
        `client_id` and no conversation_id creates, for `scope` (a user id, or the client
        address of an anonymous caller). Returns the token reserved by an earlier call (a
        retry: it goes to that conversation), or None when `token` is now reserved. Kept as
        long as a session lives."""
        key = self.keys.chat_client(scope, client_id)
        earlier: Any = await self.redis.set(key, token, nx=True, get=True, ex=self._ttl)
        if earlier is None:
            return None
        return earlier.decode() if isinstance(earlier, bytes) else str(earlier)

    async def recent_messages(
        self,
        token: str,
        count: int,
        attempt: str | None = None,
        lease: tuple[str, str, int] | None = None,
    ) -> Recent | None:
        """The session's newest `count` messages and its latest stop time, in one round trip:
        what the worker reads for each message it answers, so the cost of an answer does not
        grow with the length of the history. None when the session does not exist.

        `attempt`: a message id whose generation attempt is counted in the same step (see
        `begin_attempt`; the count is `Recent.attempts`), for a worker that expects to answer
        it; one that answers another message instead takes the count back.

        `lease`: (key, owner, ms) of the session's lease (worker/leases.py), taken in the same
        step. Raises LeaseBusy, having read and counted nothing, when another owner holds it."""
        owed = self._owed_attempts.get(attempt, 0) if attempt is not None else 0
        keys = [
            self.keys.session(token),
            self.keys.stop(token),
            self.keys.attempts(token, attempt or "-"),
        ]
        args: list[str | int] = [count, "" if attempt is None else 1 - owed, self._ttl]
        if lease is not None:
            keys.append(lease[0])
            args.extend(lease[1:])
        result: Any = await self._pipeline.script(self._begin_turn, keys, args)
        if result == 0:
            raise LeaseBusy(token)
        if result is None:
            return None
        if attempt is not None:
            self._owed_attempts.pop(attempt, None)
        raw, stopped, attempts = result
        messages, unanswered = _parse_window(raw, count)
        return Recent(
            messages,
            _stop_time(stopped),
            complete=len(messages) < count,
            attempts=None if attempts is None else int(attempts),
            unanswered=unanswered,
        )

    # --- Messages ----------------------------------------------------------------------------

    async def queue_message(
        self,
        token: str,
        text: str,
        client_id: str | None = None,
        *,
        address: str | None = None,
        rate_limited: bool = True,
        backlog_capped: bool = True,
        message_id: str | None = None,
    ) -> Queued | RateLimited | BacklogFull | None:
        """Check the address's rate limit, then the session's backlog (MAX_UNANSWERED_MESSAGES)
        and rate limit, and store the message, queue it for a worker and announce it (its
        `ack`), trimming the history to its cap: one atomic step and one round trip in the
        session's slot. On a Redis Cluster the address's key sits in another slot, so its check
        is a step of its own before it. The message is stamped with Redis's time, not this
        process's. Returns None when the session has expired. `rate_limited`/`backlog_capped`
        False: no limit (test shortcuts). `message_id` (`client_message_id`): a retry with it
        is not stored again.

        The address limit counts attempts, so a message the session's own checks refuse still
        counts against its address. Once the message is stored, nothing after it (the owner's
        index, the live-workers count) can turn it into an error: see `_after_store`."""
        settings = self._settings
        per_address = settings.rate_limit_address_messages if rate_limited and address else 0
        window_s = settings.rate_limit_window_seconds
        keys = [
            self.keys.session(token),
            self.keys.requests_for(token),
            self.keys.session_rate(token),
        ]
        address_args: list[int] = []
        if per_address and is_cluster(self.redis):
            wait = await self.check_rate("msg-address", address or "-", per_address, window_s)
            if wait:
                return RateLimited(wait)
        elif per_address:
            keys.append(self.keys.rate("msg-address", address or "-"))
            address_args.append(per_address)
        message = Message(id=message_id or new_id(), source=Source.HUMAN, msg=text)
        ack = AckEvent(
            id=message.id, msg=message.msg, timestamp=message.timestamp, client_id=client_id
        )
        message_json = message.model_dump_json(exclude_none=True)
        # The member the script replaces with Redis's time, in the message and in the ack.
        stamp = '"timestamp":' + json.dumps(message.model_dump(mode="json")["timestamp"])
        result: Any = await self._pipeline.script(
            self._add_human,
            keys,
            [
                message_json,
                self._ttl,
                stamp,
                token,
                message.id,
                self.keys.events(token),
                dump_event(ack),
                settings.rate_limit_session_messages if rate_limited else 0,
                window_s * 1000,
                self._history_cap,
                settings.max_unanswered_messages if backlog_capped else 0,
                json.dumps(title_from_message(text)),
                *address_args,
            ],
        )
        status = int(result[0])
        if status == 0:
            return None
        if status in (2, 5):  # the session's limit, or the address's
            return RateLimited(retry_after_seconds(int(result[1])))
        if status == 4:
            return BacklogFull(int(result[1]))
        if status == 3:  # a retry of a call that had stored it
            return Queued(message, workers_alive=True)
        message.timestamp = datetime.fromisoformat(str(result[2]))  # Redis's clock, not ours
        return Queued(message, workers_alive=await self._after_store(token, message, result[3]))

    async def _after_store(self, token: str, message: Message, owner: str | bytes) -> bool:
        """The steps after a message is stored, in other slots: touch the owner's index
        (core/conversations.py) and count the live workers. The message is stored and
        acknowledged whatever they answer, so a failure here is logged, never raised: the
        index is only an order (repaired by the next message or read), and an unknown
        worker count means no `queued` notice. Returns whether workers are alive."""
        if owner:
            user_id = owner.decode() if isinstance(owner, bytes) else str(owner)
            try:
                await self.index.touch(user_id, token, _epoch_ms(message.timestamp))
            except (RedisError, OSError) as exc:
                logger.warning("conversation index of a user not touched: %s", exc)
        try:
            return await self._workers_alive()
        except (RedisError, OSError) as exc:
            logger.warning("live workers not counted: %s", exc)
            return True

    async def _workers_alive(self) -> bool:
        """Whether any worker sent a heartbeat within the lease (count_workers.lua). A yes is
        trusted for a second per process, so a busy server does not pay a round trip per
        message for it; a no is read again each time, so the `queued` notice stops as soon as
        a worker is back."""
        now = time.monotonic()
        if self._workers_seen_at is not None and now - self._workers_seen_at < WORKERS_SEEN_SECONDS:
            return True
        lease_ms = int(self._settings.worker_lease_seconds * 1000)
        count: Any = await self._count_workers(keys=[self.keys.workers_alive], args=[lease_ms])
        self._workers_seen_at = now if int(count) > 0 else None
        return self._workers_seen_at is not None

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
        self,
        token: str,
        reply: Message,
        event: MessageEvent | ErrorEvent,
        lease_owner: str,
        *,
        finish: str | None = None,
        delta: DeltaEvent | None = None,
    ) -> ReplyOutcome:
        """Append a bot reply unless one exists already, and only while holding the lease.

        Once the message has its answer (this one, or one stored before), its generation-attempt
        counter (`begin_attempt`) is deleted in the same step. `finish`: the request-stream
        entry this reply completes; unless the lease was lost, the lease is released and the
        entry acknowledged and deleted in the same step too (the worker's last round trip for
        an entry, see worker/leases.py). `delta`: the reply's last `token` event, published
        first (unless the lease was lost), so it comes before the reply's own event."""
        assert reply.reply_to is not None and is_uuid4(reply.reply_to)
        result = await self._pipeline.script(
            self._add_reply,
            [
                self.keys.session(token),
                self.keys.lease(token),
                self.keys.attempts(token, reply.reply_to),
                self.keys.requests_for(token),
            ],
            [
                lease_owner,
                reply.reply_to,
                reply.model_dump_json(exclude_none=True),
                self._ttl,
                self.keys.events(token),
                dump_event(event),
                self._history_cap,
                self.keys.group,
                finish or "",
                "" if delta is None else dump_event(delta),
            ],
        )
        return ReplyOutcome(int(result))

    async def publish_delta(self, token: str, event: DeltaEvent) -> None:
        """Send a piece of a reply being generated to the session's sockets."""
        await self._pipeline.command("SPUBLISH", self.keys.events(token), dump_event(event))

    # --- Conversations (API v1 and slash commands) ------------------------------------------

    async def set_title(self, token: str, title: str) -> bool:
        """Rename; False when the session does not exist. Every socket hears of it."""
        event = ConversationEvent(change=ConversationChange.TITLE, title=title)
        return await self._change_conversation(token, event, json.dumps(title))

    async def reset(self, token: str) -> bool:
        """Empty the history and stop the reply in progress; a reply to a message from
        before the reset is not stored (add_reply.lua answers QUESTION_GONE)."""
        return await self._change_conversation(
            token, ConversationEvent(change=ConversationChange.RESET)
        )

    async def delete(self, token: str) -> bool:
        """Delete the session and stop its reply in progress: its sockets are told (the
        server closes them with 1008), and a reply being generated is never stored
        (add_reply.lua finds no session). The owner's index forgets it afterwards."""
        owner = await self.owner(token)
        deleted = await self._change_conversation(
            token, ConversationEvent(change=ConversationChange.DELETED)
        )
        if owner is not None:
            await self.index.remove(owner, token)
        return deleted

    async def owner(self, token: str) -> str | None:
        """The user id that owns the session; None for an anonymous or missing one."""
        if not is_uuid4(token):
            return None
        values: Any = await self.redis.json().get(self.keys.session(token), "$.user_id")
        return values[0] if values and isinstance(values[0], str) else None

    async def _change_conversation(
        self, token: str, event: ConversationEvent, title: str = ""
    ) -> bool:
        if not is_uuid4(token):
            return False
        stop = json.dumps({"type": "stop", "token": token})
        changed = await self._change(
            keys=[self.keys.session(token), self.keys.stop(token)],
            args=[
                event.change.value,
                title,
                self._ttl,
                self.keys.events(token),
                dump_event(event),
                self.keys.control_for(token),
                stop,
            ],
        )
        return bool(int(changed))

    # --- Generation attempts (the poison-message guard) ----------------------------------------

    async def begin_attempt(self, token: str, message_id: str) -> int:
        """Count one more generation of a reply to `message_id`; returns the count.

        The count is deleted with the stored answer (add_reply.lua) and taken back
        (`take_back_attempt`) when an attempt ends in a way the worker sees and expects (a
        Redis outage, a lost lease, a shutdown), so only attempts whose worker died (or that
        hit an unexpected failure) stay counted. The stream's delivery count is no measure of
        that: every entry a dead worker held is delivered again, the ones it was only holding
        (waiting for the session's lease or a slot) included.
        """
        key = self.keys.attempts(token, message_id)
        owed = self._owed_attempts.get(message_id, 0)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, 1 - owed)
            pipe.expire(key, self._ttl)
            count, _ = await pipe.execute()
        self._owed_attempts.pop(message_id, None)
        return int(count)

    async def take_back_attempt(self, token: str, message_id: str) -> None:
        """Uncount an attempt that did not end in a dying worker. If Redis refuses the write,
        the count is owed and taken back with this process's next attempt at the message."""
        key = self.keys.attempts(token, message_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.decr(key)
                pipe.expire(key, self._ttl)
                await pipe.execute()
        except (RedisError, OSError):
            self._owed_attempts[message_id] = self._owed_attempts.get(message_id, 0) + 1

    # --- Stop requests -----------------------------------------------------------------------

    async def request_stop(self, token: str) -> None:
        """Ask whichever worker generates for this session to stop; remembered for late
        starters. The stop is stamped with Redis's time, the clock messages are stamped with,
        so a server with a skewed clock cannot stop the wrong message."""
        command = json.dumps({"type": "stop", "token": token})
        await self._request_stop(
            keys=[self.keys.stop(token)], args=[self._ttl, self.keys.control_for(token), command]
        )


def _parse_messages(raw: object) -> list[Message] | None:
    if raw is None:
        return None
    if isinstance(raw, str | bytes):
        matches = _MESSAGE_MATCHES.validate_json(raw)
    else:  # the client decoded it already (redis-py's JSON callbacks, once `.json()` was used)
        matches = _MESSAGE_MATCHES.validate_python(raw)
    return matches[0] if matches else None


def _parse_slice(raw: object) -> list[Message] | None:
    if raw is None:
        return None
    if isinstance(raw, str | bytes):
        return _MESSAGE_SLICE.validate_json(raw)
    return _MESSAGE_SLICE.validate_python(raw)


def _parse_window(raw: str | bytes, count: int) -> tuple[list[Message], int]:
    """begin_turn.lua's window: the newest `count` messages and the waiting count."""
    window = _WINDOW.validate_json(raw)
    messages = cast(list[Message], window.get(f"$.messages[-{count}:]", []))
    unanswered = cast(list[int], window.get("$.unanswered", []))
    return messages, unanswered[0] if unanswered else 0


def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _stop_time(value: str | bytes | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(int(value) / 1_000_000, UTC)
