"""Answering one session's queued messages, in order, while holding its lease."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from core.config import Settings
from core.metrics import (
    FIRST_TOKEN_SECONDS,
    GENERATIONS_IN_FLIGHT,
    MODEL_ERRORS,
    REPLIES,
    REPLY_SECONDS,
)
from core.models import (
    DeltaEvent,
    ErrorCode,
    Message,
    ReplyError,
    Source,
    new_id,
    reply_event,
    short,
    utcnow,
)
from core.store import Recent, ReplyOutcome, SessionStore
from worker.backends import ModelBackend, ModelFailure
from worker.backends.base import Usage
from worker.leases import SessionLease
from worker.prompt import conversation_until, unanswered

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker took the session over; this one must not store anything for it."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One message to answer and what answering it needs."""

    token: str
    human: Message
    # The newest messages of the session, the human message among them.
    messages: Sequence[Message]
    lease: SessionLease
    stop: asyncio.Event
    # The request-stream entry this turn's stored reply finishes (the entry's last turn), or
    # None; see SessionStore.add_reply.
    finish: str | None = None
    # This message's generation attempts, counted as its turn was read; None: not yet counted.
    attempts: int | None = None


# What a generation came to.
@dataclass(frozen=True, slots=True)
class Finished:
    pass


@dataclass(frozen=True, slots=True)
class Stopped:
    """Cut short by a stop request, or by MAX_REPLY_CHARS (`capped`)."""

    capped: bool = False


@dataclass(frozen=True, slots=True)
class LeaseWasLost:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    error: ReplyError


Outcome = Finished | Stopped | LeaseWasLost | Failed


class DeltaPublisher:
    """Sends a reply's pieces as `token` events, coalesced: the first piece at once, the later
    ones at most every TOKEN_FLUSH_MS (buffered, flushed by a timer), so a fast model costs a
    PUBLISH per interval instead of one per token, and a pause in the model does not hold the
    text back longer than the interval.

    Publishes go one at a time under a lock, so token events keep their order. `rest` hands
    over what is left, which the reply's script publishes before the `message` event (that
    event must come last); `drop` discards it (a lost lease: the session belongs to another
    worker now). A failed timed publish is raised by the next `add` or `rest`.
    """

    def __init__(
        self, store: SessionStore, token: str, reply_id: str, reply_to: str, interval: float
    ) -> None:
        self._store, self._token = store, token
        self._reply_id, self._reply_to = reply_id, reply_to
        self._interval = interval
        self._buffer: list[str] = []
        self._last_sent: float | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._timed: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def add(self, piece: str) -> None:
        self._raise_failure()
        self._buffer.append(piece)
        now = asyncio.get_running_loop().time()
        if self._last_sent is None or now - self._last_sent >= self._interval:
            self._cancel_timer()
            await self._send()
        elif self._timer is None:
            delay = self._last_sent + self._interval - now
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    async def rest(self) -> DeltaEvent | None:
        """The text not sent yet, as the last `token` event, for the reply's own script to
        publish before its `message` event (one round trip less per reply); None when all was
        sent. A timed publish in flight is waited for first, so the order holds."""
        self._cancel_timer()
        if self._timed is not None:
            await asyncio.wait({self._timed})
        self._raise_failure()
        async with self._lock:
            if not self._buffer:
                return None
            delta = "".join(self._buffer)
            self._buffer.clear()
            return DeltaEvent(id=self._reply_id, reply_to=self._reply_to, delta=delta)

    def drop(self) -> None:
        self._cancel_timer()
        if self._timed is not None:
            self._timed.cancel()
        self._buffer.clear()

    def _on_timer(self) -> None:
        self._timer = None
        self._timed = asyncio.create_task(self._send_timed())

    async def _send_timed(self) -> None:
        try:
            await self._send()
        except Exception as exc:  # handed to the generation: raised by its next add or flush
            self._failure = exc

    async def _send(self) -> None:
        async with self._lock:
            if not self._buffer:
                return
            delta = "".join(self._buffer)
            self._buffer.clear()
            self._last_sent = asyncio.get_running_loop().time()
            event = DeltaEvent(id=self._reply_id, reply_to=self._reply_to, delta=delta)
            await self._store.publish_delta(self._token, event)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure


def recent_window(settings: Settings) -> int:
    """How many of the newest messages the worker reads first for each answer: the prompt's
    history plus room for two messages waiting (each with the reply stored after it), 16 by
    default. Parsing the window was about a sixth of the worker's CPU at the 36 messages it
    read before; a turn that finds more messages waiting than its window holds reads
    `wide_window`, then the whole history."""
    return 2 * (settings.prompt_history_messages + 2) + 4


def wide_window(settings: Settings) -> int:
    """Enough of the newest messages to hold every message the session may have waiting
    (MAX_UNANSWERED_MESSAGES, or 32 with no limit) and the prompt's history before them."""
    waiting = settings.max_unanswered_messages or 32
    return 2 * (settings.prompt_history_messages + waiting) + 8


class Responder:
    def __init__(self, store: SessionStore, backend: ModelBackend, settings: Settings) -> None:
        self._store = store
        self._backend = backend
        self._settings = settings
        self._window = recent_window(settings)
        self._wide_window = wide_window(settings)
        #: Stop signals of the generations running now, by session token.
        self.stop_signals: dict[str, asyncio.Event] = {}

    def request_stop(self, token: str) -> None:
        signal = self.stop_signals.get(token)
        if signal is not None:
            signal.set()

    async def answer_through(
        self, token: str, message_id: str, lease: SessionLease, entry_id: str | None = None
    ) -> bool:
        """Answer the session's unanswered messages up to and including `message_id`.

        Oldest first: if an earlier message is still unanswered (its worker died and it has not
        been reclaimed yet), it is answered before this one, so the prompt always holds the
        previous reply. Messages already answered are left alone (exactly once).

        A message whose generation was cut short by a dying worker WORKER_MAX_DELIVERIES
        times gets an error reply instead of one more attempt that may kill this worker too
        (see `SessionStore.begin_attempt`).

        `entry_id`: the request-stream entry of `message_id`. Returns True when storing the
        reply to `message_id` also released the lease and finished that entry (one round
        trip); False when the caller still has both to do.
        """
        while True:
            # Listen first, then look: a stop arriving between the two is not missed.
            stop = asyncio.Event()
            self.stop_signals[token] = stop
            try:
                turn = await self._next_turn(token, message_id, lease, stop, entry_id)
                if turn is None:
                    return False
                await self._answer(turn)
            finally:
                if self.stop_signals.get(token) is stop:
                    del self.stop_signals[token]
            if turn.human.id == message_id:
                # The target was the last one due: no need to read the history again.
                return turn.finish is not None

    async def _next_turn(
        self,
        token: str,
        message_id: str,
        lease: SessionLease,
        stop: asyncio.Event,
        entry_id: str | None,
    ) -> Turn | None:
        """The oldest unanswered message up to `message_id`, read from the newest messages
        only (the whole history only when `message_id` is older than those). The read counts
        an attempt for `message_id`, the message due in all but rare cases; when another one
        is due, or none, the count is taken back."""
        # The entry's first read also takes the session's lease (LeaseBusy if another holds it).
        recent = await self._store.recent_messages(
            token, self._window, attempt=message_id, lease=lease.to_take
        )
        if recent is not None:
            lease.taken = True
        attempts = recent.attempts if recent is not None else None
        try:
            if recent is not None and self._misses(recent, message_id):
                recent = await self._read_more(token, message_id, recent)
        except (RedisError, OSError, asyncio.CancelledError):
            if attempts is not None:  # not a dying worker's attempt (see `_answer`)
                await self._store.take_back_attempt(token, message_id)
            raise
        turn = self._turn_from(token, message_id, lease, stop, recent)
        if turn is not None and turn.human.id == message_id:
            return replace(turn, finish=entry_id, attempts=attempts)
        if attempts is not None:
            await self._store.take_back_attempt(token, message_id)
        return turn

    async def _read_more(self, token: str, message_id: str, recent: Recent) -> Recent | None:
        """The wide window, then the whole history, until the messages read hold the due one
        and every message waiting before it."""
        messages, stopped_at = await self._store.messages_and_stop(token, self._wide_window)
        if messages is None:
            return None
        wider = Recent(
            messages,
            stopped_at,
            complete=len(messages) < self._wide_window,
            unanswered=recent.unanswered,
        )
        if not self._misses(wider, message_id):
            return wider
        messages, stopped_at = await self._store.messages_and_stop(token)
        return None if messages is None else Recent(messages, stopped_at, complete=True)

    def _misses(self, recent: Recent, message_id: str) -> bool:
        """True when messages older than `recent` may matter: it is not the whole history,
        and it lacks `message_id`, or some of the session's messages waiting for a reply, or
        room before the oldest of those for the prompt's history (each message with its
        reply: twice PROMPT_HISTORY_MESSAGES)."""
        if recent.complete:
            return False
        if not any(m.id == message_id for m in recent.messages):
            return True
        waiting = unanswered(recent.messages)
        if len(waiting) < recent.unanswered:
            return True
        if not waiting:
            return False
        oldest = next(i for i, m in enumerate(recent.messages) if m is waiting[0])
        return oldest < 2 * self._settings.prompt_history_messages

    def _turn_from(
        self,
        token: str,
        message_id: str,
        lease: SessionLease,
        stop: asyncio.Event,
        recent: Recent | None,
    ) -> Turn | None:
        if recent is None:
            logger.info("session %s is gone; nothing to answer", short(token))
            return None
        position = {m.id: i for i, m in enumerate(recent.messages)}
        if message_id not in position:
            logger.warning("message %s is not in session %s", message_id, short(token))
            return None
        due = [m for m in unanswered(recent.messages) if position[m.id] <= position[message_id]]
        if not due:
            return None
        if recent.stopped_at is not None and recent.stopped_at >= due[0].timestamp:
            stop.set()  # stopped before generation started (both times are Redis's clock)
        return Turn(token, due[0], recent.messages, lease, stop)

    async def _give_up(self, turn: Turn) -> None:
        logger.error("giving up on message %s of session %s", turn.human.id, short(turn.token))
        detail = (
            f"This message could not be answered: workers stopped while answering it "
            f"{self._settings.worker_max_deliveries} times"
        )
        reply = Message(
            source=Source.BOT,
            msg="",
            reply_to=turn.human.id,
            error=ReplyError(code=ErrorCode.MODEL_ERROR, detail=detail),
        )
        await self._store_reply(turn, reply)

    async def _answer(self, turn: Turn) -> None:
        # Storing the answer (add_reply.lua) deletes the count; see SessionStore.begin_attempt.
        attempts = turn.attempts
        if attempts is None:
            attempts = await self._store.begin_attempt(turn.token, turn.human.id)
        if attempts > self._settings.worker_max_deliveries:
            await self._give_up(turn)
            return
        try:
            await self._generate_and_store(turn)
        except (RedisError, OSError, LeaseLost, asyncio.CancelledError):
            # Redis outage, session taken over, shutdown: not a dead worker (this process is
            # still here to see it), so it does not count. Any other failure does.
            await self._store.take_back_attempt(turn.token, turn.human.id)
            raise

    async def _generate_and_store(self, turn: Turn) -> None:
        started = time.monotonic()
        limit = self._settings.prompt_history_messages
        history = conversation_until(turn.messages, turn.human.id)[-limit:]
        reply = Message(id=new_id(), source=Source.BOT, msg="", reply_to=turn.human.id)
        parts: list[str] = []
        interval = self._settings.token_flush_ms / 1000
        publisher = DeltaPublisher(self._store, turn.token, reply.id, turn.human.id, interval)
        usage = Usage()
        try:
            outcome = await self._generate(turn, publisher, history, parts, usage)
            if isinstance(outcome, LeaseWasLost):
                raise LeaseLost(turn.token)
            # Stopped, capped, failed or finished: the text streamed so far all goes out
            # before the stored reply's `message` event (the rest by the reply's script).
            rest = await publisher.rest()
        finally:
            publisher.drop()  # a lost lease, an outage, a shutdown: the rest is not sent
        reply.msg = "".join(parts).strip()
        reply.timestamp = utcnow()
        if isinstance(outcome, Failed):
            reply.error = outcome.error
        elif isinstance(outcome, Stopped):
            reply.stopped = True
        elif not reply.msg:
            reply.error = ReplyError(
                code=ErrorCode.MODEL_ERROR, detail="The model gave an empty reply"
            )
        if reply.error is not None:
            MODEL_ERRORS.labels(reply.error.code.value).inc()
        else:
            reply.tokens_used = self._tokens_used(usage, history, reply.msg)
        await self._store_reply(turn, reply, rest)
        REPLY_SECONDS.observe(time.monotonic() - started)

    def _tokens_used(self, usage: Usage, history: Sequence[Message], text: str) -> int | None:
        """Prompt plus completion tokens: the backend's counts (the provider's own when it
        reported them), the rest counted here; None when no generation started (a message
        stopped before its turn: nothing was sent to the model)."""
        if usage.prompt is None and not text:
            return None
        prompt = usage.prompt if usage.prompt is not None else self._backend.prompt_tokens(history)
        completion = (
            usage.completion if usage.completion is not None else self._backend.count_tokens(text)
        )
        return prompt + completion

    async def _store_reply(
        self, turn: Turn, reply: Message, rest: DeltaEvent | None = None
    ) -> None:
        stored = await self._store.add_reply(
            turn.token, reply, reply_event(reply), turn.lease.owner, finish=turn.finish, delta=rest
        )
        if stored is ReplyOutcome.LEASE_LOST:
            raise LeaseLost(turn.token)
        if stored is ReplyOutcome.STORED:
            REPLIES.labels(_outcome(reply)).inc()
        else:
            logger.info("reply to %s not stored: %s", reply.reply_to, stored.name)

    async def _stream(
        self,
        publisher: DeltaPublisher,
        history: Sequence[Message],
        parts: list[str],
        usage: Usage,
    ) -> bool:
        """Stream the model's reply into `parts` and to the session's sockets; True when it
        reached MAX_REPLY_CHARS and was cut there (the generation is then cancelled)."""
        room = self._settings.max_reply_chars
        started, first = time.monotonic(), True
        deltas = self._backend.stream_reply(history, usage)
        try:
            async for delta in deltas:
                piece = delta[:room]
                room -= len(piece)
                if piece:
                    if first:
                        FIRST_TOKEN_SECONDS.observe(time.monotonic() - started)
                        first = False
                    parts.append(piece)
                    await publisher.add(piece)
                if room <= 0:
                    return True
            return False
        finally:
            close = getattr(deltas, "aclose", None)
            if close is not None:  # ends the backend's request now, not at garbage collection
                await close()

    async def _generate(
        self,
        turn: Turn,
        publisher: DeltaPublisher,
        history: Sequence[Message],
        parts: list[str],
        usage: Usage,
    ) -> Outcome:
        """Run the generation until it ends, is stopped, loses its lease or times out."""
        if turn.stop.is_set():
            return Stopped()
        generation = asyncio.create_task(self._stream(publisher, history, parts, usage))
        stopped = asyncio.create_task(turn.stop.wait())
        lost = asyncio.create_task(turn.lease.lost.wait())
        timeout = self._settings.model_timeout_seconds
        GENERATIONS_IN_FLIGHT.inc()
        try:
            await asyncio.wait(
                {generation, stopped, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            finished = generation.done()
        finally:
            GENERATIONS_IN_FLIGHT.dec()
            for task in (generation, stopped, lost):
                task.cancel()
            await asyncio.wait({generation, stopped, lost})
        if turn.lease.lost.is_set():
            return LeaseWasLost()
        if turn.stop.is_set():
            return Stopped()
        if not finished:
            return Failed(
                ReplyError(
                    code=ErrorCode.TIMEOUT, detail=f"The model did not finish within {timeout:g} s"
                )
            )
        exc = generation.exception()
        if exc is None:
            return Stopped(capped=True) if generation.result() else Finished()
        if isinstance(exc, ModelFailure):
            logger.warning("session %s: %s", short(turn.token), exc.detail)
            return Failed(ReplyError(code=exc.code, detail=exc.detail))
        raise exc


def _outcome(reply: Message) -> str:
    """chat_replies_total's label: answered, stopped, or the error's code."""
    if reply.error is not None:
        return reply.error.code.value
    return "stopped" if reply.stopped else "answered"
