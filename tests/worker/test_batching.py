"""Continuous batching of the local model, with the real SmolLM2-135M weights.

Several replies share one llama.cpp decode: they must all flow at once, stay apart (no text of
one sequence in another), and a stop must give its slot back before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from typing import cast

import pytest

from core.config import Settings
from core.cpus import physical_cores
from core.models import Message, Source
from tests.conftest import make_settings
from worker.backends import ModelError
from worker.backends.batching import END, BatchEngine, EngineConfig, Generation
from worker.backends.local import LocalBackend
from worker.backends.model_file import model_file

pytestmark = pytest.mark.slow

# Words SmolLM2-135M does repeat when asked (it answers "Repeat the word peach." with "Pineapple.").
WORDS = ["banana", "cherry", "mango", "tiger", "pencil", "rocket", "candle", "dragon"]


def ask(text: str) -> list[Message]:
    return [Message(source=Source.HUMAN, msg=text)]


@pytest.fixture
def greedy(redis_url: str) -> Settings:
    return make_settings(
        redis_url, model_backend="local", model_temperature=0.0, model_max_new_tokens=24
    )


@pytest.fixture
async def backend(greedy: Settings) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(greedy)
    await local.start()
    yield local
    await local.aclose()


async def reply(backend: LocalBackend, text: str) -> str:
    return "".join([p async for p in backend.stream_reply(ask(text))])


def test_the_slots_follow_the_setting(greedy: Settings) -> None:
    assert LocalBackend(greedy).max_concurrency == 8
    assert LocalBackend(greedy.model_copy(update={"local_batch_slots": 3})).max_concurrency == 3


async def test_eight_replies_flow_at_once(redis_url: str) -> None:
    """Each of 8 streams yields its first piece before any of them has finished."""
    settings = make_settings(redis_url, model_backend="local", model_max_new_tokens=200)
    local = LocalBackend(settings)
    await local.start()
    streams = [
        cast(AsyncGenerator[str, None], local.stream_reply(ask(f"Write a long poem about {w}.")))
        for w in WORDS
    ]
    try:
        first = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), 120)
        assert all(first)
        assert local.active_slots == len(WORDS)  # all eight still generating, side by side
    finally:
        for stream in streams:
            await stream.aclose()
        await local.aclose()


async def test_concurrent_replies_do_not_mix(backend: LocalBackend) -> None:
    replies = await asyncio.gather(*(reply(backend, f"Repeat the word {w}.") for w in WORDS))
    for word, text in zip(WORDS, replies, strict=True):
        assert word in text.lower(), (word, text)
        others = [w for w in WORDS if w != word and w in text.lower()]
        assert not others, (word, text)
    assert len(set(replies)) == len(WORDS)


async def test_batched_starts_like_the_reply_alone_at_temperature_zero(
    backend: LocalBackend,
) -> None:
    """Greedy replies in a batch of 8 begin as they do alone.

    They are not bit-identical over a long reply: a batched matrix product rounds a little
    differently, and greedy picks can tip after a few words ("Lemon is a fruit that is often
    confused with lemons." alone, "... often used to make lemonades." in a batch).
    """
    prompts = [f"Repeat the word {w}." for w in WORDS]
    alone = [await reply(backend, p) for p in prompts]
    together = await asyncio.gather(*(reply(backend, p) for p in prompts))
    for one, batched in zip(alone, together, strict=True):
        assert one.strip()
        assert batched.split()[:2] == one.split()[:2], (one, batched)


async def test_a_stop_frees_its_slot_at_once_and_the_others_keep_flowing(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url, model_backend="local", model_max_new_tokens=400)
    local = LocalBackend(settings)
    await local.start()
    streams = [
        cast(AsyncGenerator[str, None], local.stream_reply(ask(f"Tell a long story about {w}.")))
        for w in WORDS[:3]
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), 60)
        assert local.active_slots == 3
        await streams[0].aclose()  # returns once the engine has dropped the sequence
        assert local.active_slots == 2

        async def ten(stream: AsyncGenerator[str, None]) -> list[str]:
            return [await anext(stream) for _ in range(10)]

        more = await asyncio.wait_for(asyncio.gather(*(ten(s) for s in streams[1:])), 60)
        assert all(len(pieces) == 10 and all(pieces) for pieces in more)
    finally:
        for stream in streams:
            await stream.aclose()
        await local.aclose()
    assert local.active_slots == 0


async def test_more_requests_than_slots_wait_for_a_free_one(greedy: Settings) -> None:
    local = LocalBackend(greedy.model_copy(update={"local_batch_slots": 2}))
    await local.start()
    try:
        seen = 0

        async def count(text: str) -> str:
            nonlocal seen
            seen = max(seen, local.active_slots)
            return await reply(local, text)

        replies = await asyncio.wait_for(
            asyncio.gather(*(count(f"Repeat the word {w}.") for w in WORDS[:5])), 120
        )
        assert all(r.strip() for r in replies)
        assert seen <= 2
    finally:
        await local.aclose()


async def test_a_conversation_longer_than_a_slot_is_cut_to_fit_it(greedy: Settings) -> None:
    """The backend fits the prompt to the slot (worker/prompt.py fit_history), so an
    overlong message is answered; the engine's own check stays as the last guard."""
    local = LocalBackend(greedy.model_copy(update={"local_context_tokens": 96}))
    await local.start()
    try:
        assert (await reply(local, "word " * 200)).strip()
        engine = local._engine
        assert engine is not None
        with pytest.raises(ValueError, match="more than the 95 a slot holds"):
            engine.submit(Generation(prompt=[1] * 96, deliver=lambda _item: None))
        assert (await reply(local, "Say hello.")).strip()  # the engine is still serving
    finally:
        await local.aclose()


async def test_closing_ends_replies_in_flight_with_an_error(greedy: Settings) -> None:
    local = LocalBackend(greedy.model_copy(update={"model_max_new_tokens": 400}))
    await local.start()
    stream = cast(AsyncGenerator[str, None], local.stream_reply(ask("Tell me a long story.")))
    assert await anext(stream)
    closing = asyncio.create_task(local.aclose())
    with pytest.raises(ModelError, match="shut down"):
        async for _ in stream:
            pass
    await asyncio.wait_for(closing, 30)


async def test_a_prefill_and_a_step_of_several_use_every_core_unless_told(greedy: Settings) -> None:
    """llama.cpp runs a prompt's prefill and a step of several sequences on its batch threads;
    with them at half the cores (one of two), a first token took twice as long as with every
    core. A step of one sequence gets a thread per physical core."""
    cpus = os.sched_getaffinity(0)
    for settings, expected in (
        (greedy, (physical_cores(cpus), len(cpus))),
        (greedy.model_copy(update={"local_threads": 1, "local_batch_threads": 1}), (1, 1)),
    ):
        local = LocalBackend(settings)
        await local.start()
        try:
            assert local._engine is not None
            assert local._engine.threads == expected
        finally:
            await local.aclose()


async def test_the_default_threads_count_the_cpus_this_process_may_use(
    greedy: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinned to one CPU (taskset, a container's cpuset) on a bigger machine, the worker ran
    a batch on as many threads as the machine has CPUs, which then take turns on the one
    (docs/benchmarks.md, "Issue 12, sixth pass")."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    local = LocalBackend(greedy)
    await local.start()
    try:
        assert local._engine is not None
        assert local._engine.threads == (1, 1)
    finally:
        await local.aclose()


# --- The first piece: the next step waits for it to be sent ------------------------------------


@contextmanager
def engine_with(settings: Settings, first_piece_wait: float) -> Iterator[BatchEngine]:
    engine = BatchEngine(
        EngineConfig(
            model_path=model_file(settings),
            slots=2,
            context_per_slot=512,
            threads=None,
            temperature=0.0,
            max_new_tokens=6,
            first_piece_wait=first_piece_wait,
        )
    )
    engine.load()
    try:
        yield engine
    finally:
        engine.close()


class Pieces:
    """What the engine delivers to one generation, each with the time it came."""

    def __init__(self) -> None:
        self.items: list[tuple[float, object]] = []
        self.first = threading.Event()
        self.ended = threading.Event()

    def deliver(self, item: object) -> None:
        self.items.append((time.monotonic(), item))
        self.first.set()
        if item is END or isinstance(item, BaseException):
            self.ended.set()

    def times(self) -> list[float]:
        return [at for at, item in self.items if isinstance(item, str)]


def start(engine: BatchEngine, text: str) -> tuple[Generation, Pieces]:
    pieces = Pieces()
    prompt = engine.tokenize_chat([{"role": "user", "content": text}])
    generation = Generation(prompt=prompt, deliver=pieces.deliver)
    engine.submit(generation)
    assert pieces.first.wait(60)
    return generation, pieces


def test_the_next_step_waits_until_the_first_piece_is_sent(greedy: Settings) -> None:
    """The first token's way to the user is not raced by the next step's threads on every
    core: no second piece is decoded before the first one is marked sent."""
    with engine_with(greedy, first_piece_wait=10.0) as engine:
        generation, pieces = start(engine, "Tell a story about a cat.")
        time.sleep(0.3)  # some 25 steps' time
        assert len(pieces.times()) == 1
        sent = time.monotonic()
        generation.first_sent.set()
        assert pieces.ended.wait(30)
        assert len(pieces.times()) > 1 and pieces.times()[1] >= sent


def test_a_first_piece_nobody_sends_holds_the_steps_only_briefly(greedy: Settings) -> None:
    """Bounded: a loop too busy to send it costs the batch `first_piece_wait`, once."""
    with engine_with(greedy, first_piece_wait=0.2) as engine:
        _generation, pieces = start(engine, "Tell a story about a cat.")
        assert pieces.ended.wait(30)
        times = pieces.times()
        assert len(times) == 6
        assert 0.18 <= times[1] - times[0] < 2.0
        assert all(later - earlier < 0.15 for earlier, later in itertools.pairwise(times[1:]))


def test_a_cancelled_reply_holds_no_step(greedy: Settings) -> None:
    """A reply stopped before its first piece was sent does not keep the others waiting."""
    with engine_with(greedy, first_piece_wait=10.0) as engine:
        stopped, _ = start(engine, "Tell a story about a cat.")
        engine.cancel(stopped)
        other, pieces = start(engine, "Tell a story about a dog.")
        other.first_sent.set()
        assert pieces.ended.wait(30)
        assert len(pieces.times()) == 6


async def test_the_backend_marks_a_piece_sent_when_the_next_is_asked_for(
    backend: LocalBackend,
) -> None:
    stream = cast(AsyncGenerator[str, None], backend.stream_reply(ask("Tell a story.")))
    try:
        assert await anext(stream)
        assert backend._engine is not None
        (generation,) = backend._engine._active
        assert not generation.first_sent.is_set()  # handed to us, not sent on yet
        await anext(stream)
        assert generation.first_sent.is_set()
    finally:
        await stream.aclose()
