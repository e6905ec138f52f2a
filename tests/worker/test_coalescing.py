"""Token events are coalesced: at most one PUBLISH per TOKEN_FLUSH_MS while the model streams.

The first piece goes out at once; the rest is buffered and flushed by time, and always before
the reply is stored, so the final `message` event follows every `token` event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from core.config import Settings
from core.models import DeltaEvent, Message
from core.store import SessionStore
from tests.conftest import make_settings
from tests.support import sessions
from tests.support.model_servers import ModelServer
from tests.support.redis_stats import command_calls, redis_commands
from worker.backends import ModelBackend
from worker.backends.base import Usage
from worker.leases import SessionLease
from worker.responder import LeaseLost, Responder
from worker.worker import Worker


class RecordingStore(SessionStore):
    """The real store, noting every publish (the last one rides with the reply, see
    DeltaPublisher.rest) and the moment the reply was stored."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        super().__init__(redis, settings)
        self.log: list[tuple[str, str]] = []  # ("publish", delta) or ("reply", text)

    async def publish_delta(self, token: str, event: DeltaEvent) -> None:
        self.log.append(("publish", event.delta))
        await super().publish_delta(token, event)

    async def add_reply(self, token: str, reply: Message, *args: Any, **kwargs: Any) -> Any:
        rest = kwargs.get("delta")
        if rest is not None:  # published by the reply's script, before the reply's event
            self.log.append(("publish", rest.delta))
        self.log.append(("reply", reply.msg))
        return await super().add_reply(token, reply, *args, **kwargs)

    def deltas(self) -> list[str]:
        return [text for kind, text in self.log if kind == "publish"]


class PacedBackend(ModelBackend):
    """Yields `pieces`, sleeping `pause` before each one after the first; then `tail_wait`
    before the `tail` pieces (a model that pauses mid-reply)."""

    def __init__(
        self,
        pieces: Sequence[str],
        pause: float,
        tail: Sequence[str] = (),
        tail_wait: float = 0.0,
        hang: bool = False,
    ) -> None:
        self.pieces, self.pause, self.tail, self.tail_wait = pieces, pause, tail, tail_wait
        self.hang = hang
        self.tail_started = asyncio.Event()

    async def stream_reply(
        self, history: Sequence[Message], usage: Usage | None = None
    ) -> AsyncIterator[str]:
        for i, piece in enumerate(self.pieces):
            if i and self.pause:
                await asyncio.sleep(self.pause)
            yield piece
        self.tail_started.set()
        await asyncio.sleep(self.tail_wait)
        for piece in self.tail:
            yield piece
        if self.hang:
            await asyncio.Event().wait()


async def answer(
    redis: Redis, settings: Settings, backend: ModelBackend, stop: float | None = None
) -> tuple[RecordingStore, str]:
    """Answer one message with `backend`; `stop` seconds after starting, request a stop."""
    store = RecordingStore(redis, settings)
    session = await store.create("Ann")
    human = await sessions.add_human_message(store, session.token, "hello")
    assert human is not None
    lease = SessionLease(session.token, store.keys.lease(session.token), "me:1")
    await redis.set(lease.key, lease.owner, px=60_000)
    responder = Responder(store, backend, settings)
    task = asyncio.create_task(responder.answer_through(session.token, human.id, lease))
    if stop is not None:
        await asyncio.sleep(stop)
        responder.request_stop(session.token)
    async with asyncio.timeout(30):
        await task
    return store, session.token


async def test_a_steady_stream_is_published_in_few_batches_and_whole(
    redis: Redis, settings: Settings
) -> None:
    settings = settings.model_copy(update={"token_flush_ms": 50})
    pieces = [f" w{i}" for i in range(200)]
    # 200 pieces about 2 ms apart: ~0.4 s (more on a loaded box), so ~8 flushes by time.
    store, _ = await answer(redis, settings, PacedBackend(pieces, pause=0.002))
    deltas = store.deltas()
    assert deltas[0] == " w0"  # the first piece is sent at once, alone
    assert "".join(deltas) == "".join(pieces)
    assert len(deltas) < 60, len(deltas)  # uncoalesced: 200
    assert store.log[-1] == ("reply", "".join(pieces).strip())  # every token event first


async def test_flush_ms_zero_publishes_every_piece(redis: Redis, settings: Settings) -> None:
    settings = settings.model_copy(update={"token_flush_ms": 0})
    pieces = [f" w{i}" for i in range(50)]
    store, _ = await answer(redis, settings, PacedBackend(pieces, pause=0))
    assert store.deltas() == pieces


async def test_pieces_before_a_pause_are_flushed_by_time_not_held(
    redis: Redis, settings: Settings
) -> None:
    # A long interval, so "b" and "c" surely come within it even on a loaded machine.
    settings = settings.model_copy(update={"token_flush_ms": 300})
    backend = PacedBackend(["a", "b", "c"], pause=0, tail=["d"], tail_wait=3.0)
    store, _ = await answer(redis, settings, backend)
    deltas = store.deltas()
    # "b" and "c" come within the flush interval of "a", then the model pauses 3 s: they are
    # published by the timer during the pause, not with "d".
    assert deltas == ["a", "bc", "d"], deltas


async def test_a_stop_flushes_the_buffered_pieces_before_the_stopped_reply(
    redis: Redis, settings: Settings
) -> None:
    settings = settings.model_copy(update={"token_flush_ms": 5000})
    backend = PacedBackend(["a", "b", "c"], pause=0, hang=True)
    store, _ = await answer(redis, settings, backend, stop=0.5)
    assert store.deltas() == ["a", "bc"]
    assert store.log[-1] == ("reply", "abc")


async def test_a_lost_lease_drops_the_buffered_pieces(redis: Redis, settings: Settings) -> None:
    settings = settings.model_copy(update={"token_flush_ms": 5000})
    store = RecordingStore(redis, settings)
    session = await store.create("Ann")
    human = await sessions.add_human_message(store, session.token, "hello")
    assert human is not None
    lease = SessionLease(session.token, store.keys.lease(session.token), "me:1")
    backend = PacedBackend(["a", "b", "c"], pause=0, hang=True)
    task = asyncio.create_task(
        Responder(store, backend, settings).answer_through(session.token, human.id, lease)
    )
    await asyncio.wait_for(backend.tail_started.wait(), 10)
    lease.lost.set()
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(task, 10)
    await asyncio.sleep(0.1)
    assert store.log == [("publish", "a")]  # another worker owns the session now


async def reply_of_200_tokens(
    redis_url: str, redis: Redis, model_server: ModelServer, flush_ms: int
) -> tuple[int, int, str]:
    """PUBLISH calls and all Redis commands for one 200-piece reply through a real worker."""
    settings = make_settings(
        redis_url,
        openai_base_url=model_server.openai_base_url,
        token_flush_ms=flush_ms,
    )
    store = SessionStore(redis, settings)
    session = await store.create("Ann")
    words = " ".join(f"w{i}" for i in range(199))
    worker = Worker(settings)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.5)  # let the worker start and go idle
        before, commands_before = (
            await command_calls(redis, "spublish"),
            await redis_commands(redis),
        )
        human = await sessions.add_human_message(store, session.token, words)
        assert human is not None
        async with asyncio.timeout(30):
            while True:
                found = await sessions.messages(store, session.token) or []
                if len(found) == 2:
                    break
                await asyncio.sleep(0.05)
        after, commands_after = await command_calls(redis, "spublish"), await redis_commands(redis)
    finally:
        worker.request_shutdown()
        await running
    return after - before, commands_after - commands_before, found[1].msg


async def test_a_200_token_reply_takes_far_fewer_publishes(
    redis_url: str, redis: Redis, model_server: ModelServer
) -> None:
    # 200 pieces 2 ms apart, as a fast local model or a remote API streams them.
    model_server.behaviour.token_delay = 0.002
    off, off_commands, off_text = await reply_of_200_tokens(redis_url, redis, model_server, 0)
    on, on_commands, on_text = await reply_of_200_tokens(redis_url, redis, model_server, 30)
    assert off_text == on_text and len(on_text.split()) == 200
    # Off: a PUBLISH per piece plus the reply's own announcement (and the worker's idle polls).
    assert off >= 200, off
    assert on < off / 4, (on, off)
    print(json.dumps({"publish_off": off, "publish_on": on}))  # noqa: T201 - read with -s
    print(json.dumps({"commands_off": off_commands, "commands_on": on_commands}))  # noqa: T201
