"""Answering one session's queued messages, in order, while holding its lease."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from redis.exceptions import RedisError

from core.config import Settings
from core.models import (
    ErrorCode,
    Message,
    ReplyError,
    Source,
    TokenEvent,
    new_id,
    reply_event,
    short,
    utcnow,
)
from core.prompt import conversation_until, unanswered
from core.store import ReplyOutcome, SessionStore
from worker.backends import ModelBackend, ModelFailure
from worker.leases import SessionLease

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker took the session over; this one must not store anything for it."""


class Responder:
    def __init__(self, store: SessionStore, backend: ModelBackend, settings: Settings) -> None:
        self._store = store
        self._backend = backend
        self._settings = settings
        #: Stop signals of the generations running now, by session token.
        self.stop_signals: dict[str, asyncio.Event] = {}

    def request_stop(self, token: str) -> None:
        signal = self.stop_signals.get(token)
        if signal is not None:
            signal.set()

    async def answer_through(self, token: str, message_id: str, lease: SessionLease) -> None:
        """Answer the session's unanswered messages up to and including `message_id`.

        Oldest first: if an earlier message is still unanswered (its worker died and it has not
        been reclaimed yet), it is answered before this one, so the prompt always holds the
        previous reply. Messages already answered are left alone (exactly once).

        A message whose generation was cut short by a dying worker WORKER_MAX_DELIVERIES
        times gets an error reply instead of one more attempt that may kill this worker too
        (see `_begin_attempt`).
        """
        while True:
            # Listen first, then look: a stop arriving between the two is not missed.
            stop = asyncio.Event()
            self.stop_signals[token] = stop
            try:
                messages, stopped_at = await self._store.messages_and_stop(token)
                if messages is None:
                    logger.info("session %s is gone; nothing to answer", short(token))
                    return
                position = {m.id: i for i, m in enumerate(messages)}
                if message_id not in position:
                    logger.warning("message %s is not in session %s", message_id, short(token))
                    return
                due = [m for m in unanswered(messages) if position[m.id] <= position[message_id]]
                if not due:
                    return
                if stopped_at is not None and stopped_at >= due[0].timestamp:
                    stop.set()  # stopped before generation started
                await self._answer(token, messages, due[0], lease, stop)
            finally:
                if self.stop_signals.get(token) is stop:
                    del self.stop_signals[token]
            if due[0].id == message_id:
                # The target was the last one due: no need to read the history again.
                return

    async def _give_up(self, token: str, human: Message, lease: SessionLease) -> None:
        logger.error("giving up on message %s of session %s", human.id, short(token))
        detail = (
            f"This message could not be answered: workers stopped while answering it "
            f"{self._settings.worker_max_deliveries} times"
        )
        reply = Message(
            source=Source.BOT,
            msg="",
            reply_to=human.id,
            error=ReplyError(code=ErrorCode.MODEL_ERROR, detail=detail),
        )
        await self._store_reply(token, reply, lease)

    async def _begin_attempt(self, message_id: str) -> int:
        """Count one more generation of a reply to `message_id`; returns the count.

        The count is deleted with the stored answer (add_reply.lua) and taken back when an
        attempt ends in a way this process sees and expects (a Redis outage, a lost lease, a
        shutdown), so only attempts whose worker died (or that hit an unexpected failure) stay
        counted. The stream's delivery count is no measure of that: every entry a dead worker
        held is delivered again, the ones it was only holding (waiting for the session's lease
        or a slot) included.
        """
        key = self._store.keys.attempts(message_id)
        async with self._store.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, self._settings.session_ttl_seconds)
            count, _ = await pipe.execute()
        return int(count)

    async def _take_back_attempt(self, message_id: str) -> None:
        key = self._store.keys.attempts(message_id)
        with contextlib.suppress(RedisError, OSError):
            async with self._store.redis.pipeline(transaction=True) as pipe:
                pipe.decr(key)
                pipe.expire(key, self._settings.session_ttl_seconds)
                await pipe.execute()

    async def _answer(
        self,
        token: str,
        messages: Sequence[Message],
        human: Message,
        lease: SessionLease,
        stop: asyncio.Event,
    ) -> None:
        # Storing the answer (add_reply.lua) deletes the count; see _begin_attempt.
        if await self._begin_attempt(human.id) > self._settings.worker_max_deliveries:
            await self._give_up(token, human, lease)
            return
        try:
            await self._generate_and_store(token, messages, human, lease, stop)
        except (RedisError, OSError, LeaseLost, asyncio.CancelledError):
            # Redis outage, session taken over, shutdown: not a dead worker (this process is
            # still here to see it), so it does not count. Any other failure does.
            await self._take_back_attempt(human.id)
            raise

    async def _generate_and_store(
        self,
        token: str,
        messages: Sequence[Message],
        human: Message,
        lease: SessionLease,
        stop: asyncio.Event,
    ) -> None:
        history = conversation_until(messages, human.id)[-self._settings.prompt_history_messages :]
        reply = Message(id=new_id(), source=Source.BOT, msg="", reply_to=human.id)
        parts: list[str] = []
        outcome = await self._generate(token, reply, history, parts, stop, lease)
        if outcome == "lease_lost":
            raise LeaseLost(token)
        reply.msg = "".join(parts).strip()
        reply.timestamp = utcnow()
        if isinstance(outcome, ReplyError):
            reply.error = outcome
        elif outcome == "stopped":
            reply.stopped = True
        elif not reply.msg:
            reply.error = ReplyError(
                code=ErrorCode.MODEL_ERROR, detail="The model gave an empty reply"
            )
        await self._store_reply(token, reply, lease)

    async def _store_reply(self, token: str, reply: Message, lease: SessionLease) -> None:
        stored = await self._store.add_reply(token, reply, reply_event(reply), lease.owner)
        if stored is ReplyOutcome.LOCK_LOST:
            raise LeaseLost(token)
        if stored is not ReplyOutcome.STORED:
            logger.info("reply to %s not stored: %s", reply.reply_to, stored.name)

    async def _generate(
        self,
        token: str,
        reply: Message,
        history: Sequence[Message],
        parts: list[str],
        stop: asyncio.Event,
        lease: SessionLease,
    ) -> str | ReplyError:
        """Stream the model's reply into `parts` and to the session's sockets.

        Returns "done", "stopped", "lease_lost", or the error to store as the reply.
        """
        if stop.is_set():
            return "stopped"
        assert reply.reply_to is not None
        reply_to = reply.reply_to

        async def stream() -> None:
            async for delta in self._backend.stream_reply(history):
                parts.append(delta)
                event = TokenEvent(id=reply.id, reply_to=reply_to, delta=delta)
                await self._store.publish_token(token, event)

        generation = asyncio.create_task(stream())
        stopped = asyncio.create_task(stop.wait())
        lost = asyncio.create_task(lease.lost.wait())
        timeout = self._settings.model_timeout_seconds
        try:
            await asyncio.wait(
                {generation, stopped, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            finished = generation.done()
        finally:
            for task in (generation, stopped, lost):
                task.cancel()
            await asyncio.wait({generation, stopped, lost})
        if lease.lost.is_set():
            return "lease_lost"
        if stop.is_set():
            return "stopped"
        if not finished:
            return ReplyError(
                code=ErrorCode.TIMEOUT, detail=f"The model did not finish within {timeout:g} s"
            )
        exc = generation.exception()
        if exc is None:
            return "done"
        if isinstance(exc, ModelFailure):
            logger.warning("session %s: %s", short(token), exc.detail)
            return ReplyError(code=exc.code, detail=exc.detail)
        raise exc
