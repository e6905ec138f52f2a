"""The in-process backend with the real default model: SmolLM2-135M-Instruct on llama.cpp."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from core.config import Settings
from core.models import Message, Source
from tests.conftest import make_settings
from tests.support.stack import running_stack
from worker.backends import ModelUnavailable
from worker.backends import local as local_module
from worker.backends.base import Usage
from worker.backends.local import LocalBackend, missing_cpu_flags
from worker.prompt import CUT_MARK

pytestmark = pytest.mark.slow


@pytest.fixture
def local_settings(redis_url: str) -> Settings:
    return make_settings(redis_url, model_backend="local", model_max_new_tokens=32)


@pytest.fixture
async def backend(local_settings: Settings) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(local_settings)
    await local.start()
    yield local
    await local.aclose()


def ask(text: str) -> list[Message]:
    return [Message(source=Source.HUMAN, msg=text)]


async def test_the_default_model_loads_as_its_q8_0_copy(backend: LocalBackend) -> None:
    assert backend.model_path is not None
    assert backend.model_path.name.startswith("SmolLM2-135M-Instruct.Q8_0.")


async def test_generates_a_streamed_reply(backend: LocalBackend) -> None:
    pieces = [p async for p in backend.stream_reply(ask("What is the capital of France?"))]
    assert len(pieces) > 3
    assert "".join(pieces).strip()


async def test_event_loop_stays_responsive_while_generating(backend: LocalBackend) -> None:
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    _ = [p async for p in backend.stream_reply(ask("Tell me a story about a cat."))]
    ticker.cancel()
    # Generation runs on its own thread: the loop kept ticking (no multi-second stall).
    assert len(gaps) > 5
    assert max(gaps) < 1.0


async def test_stopping_early_frees_the_model_for_the_next_reply(backend: LocalBackend) -> None:
    stream = cast(
        AsyncGenerator[str, None], backend.stream_reply(ask("Count from one to one hundred."))
    )
    first = await anext(stream)
    await stream.aclose()
    assert first
    again = [p async for p in backend.stream_reply(ask("Say hello."))]
    assert "".join(again).strip()


async def test_missing_model_file_is_reported(redis_url: str, tmp_path: Path) -> None:
    local = LocalBackend(make_settings(redis_url, local_model_path=tmp_path / "none.gguf"))
    with pytest.raises(ModelUnavailable, match="not found"):
        await local.start()
    await local.aclose()


async def test_a_socket_session_gets_a_real_reply(local_settings: Settings) -> None:
    async with running_stack(local_settings) as stack:
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            await chat.send("Hello! Who are you?")
            reply = await chat.until("message", timeout=60)
        history = await stack.history(token)
    tokens = [e["delta"] for e in chat.events if e["type"] == "token"]
    assert len(tokens) > 1
    assert reply["msg"] and reply["msg"] == "".join(tokens).strip()
    assert [m["source"] for m in history["messages"]] == ["human", "bot"]


# --- The prompt fits the slot's context ----------------------------------------------------------

SMALL_CONTEXT = 256
LONG_MESSAGE = (
    "Here is my shopping list: "
    + "apples, pears, milk, bread, " * 130
    + ("What should I buy first?")
)  # about 3,700 characters: over a thousand tokens, four times the context


async def test_a_message_longer_than_the_context_is_answered(redis_url: str) -> None:
    """Before the prompt was fitted, this was a model_error ("the conversation is N tokens,
    more than the 255 a slot holds"). Now the message's end is kept, and the reply comes."""
    settings = make_settings(
        redis_url,
        model_backend="local",
        model_max_new_tokens=32,
        local_context_tokens=SMALL_CONTEXT,
    )
    async with running_stack(settings) as stack:
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            await chat.send(LONG_MESSAGE)
            final = await chat.until("message", "error", timeout=120)
        history = await stack.history(token)
    assert final["type"] == "message", final
    assert final["msg"]
    assert 0 < final["tokens_used"] <= SMALL_CONTEXT
    assert history["messages"][0]["msg"] == LONG_MESSAGE  # stored whole; only the prompt is cut
    assert history["messages"][1]["tokens_used"] == final["tokens_used"]


async def test_llama_cpp_counts_the_tokens_used(redis_url: str) -> None:
    settings = make_settings(
        redis_url,
        model_backend="local",
        model_max_new_tokens=32,
        local_context_tokens=SMALL_CONTEXT,
    )
    local = LocalBackend(settings)
    await local.start()
    try:
        history = ask(LONG_MESSAGE)
        usage = Usage()
        reply = "".join([p async for p in local.stream_reply(history, usage)])
        fitted = local.fit(history)
    finally:
        await local.aclose()
    assert reply.strip()
    assert fitted[0].msg.startswith(CUT_MARK) and fitted[0].msg.endswith("buy first?")
    assert usage.prompt is not None and usage.completion is not None
    # The prompt fills what the reply's room leaves of the slot (255 - 32), within a token or two
    # (the cut is by characters, and a character may not make a token of its own).
    assert SMALL_CONTEXT - 1 - 32 - 4 <= usage.prompt <= SMALL_CONTEXT - 1 - 32
    assert 0 < usage.completion <= 32


# --- The CPU check: a clear failure at start instead of SIGILL on the first message -----------

CPUINFO_AVX2 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 popcnt
processor\t: 1
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 popcnt
"""
CPUINFO_AVX_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx popcnt\n"


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    required = ["avx", "avx2", "fma", "f16c", "bmi2"]
    assert missing_cpu_flags(CPUINFO_AVX2, required) == []
    assert missing_cpu_flags(CPUINFO_AVX_ONLY, required) == ["avx2", "fma", "f16c", "bmi2"]
    assert missing_cpu_flags("no flags line here", required) == []


@pytest.fixture
def avx_only_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees an x86-64 CPU with AVX but no AVX2 (a Sandy Bridge)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO_AVX_ONLY, encoding="utf-8")
    monkeypatch.setattr(local_module, "CPUINFO", cpuinfo)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")


@pytest.mark.usefixtures("avx_only_cpu")
async def test_a_cpu_without_avx2_fails_at_start_in_words(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(LocalBackend, "_load", lambda self: loaded.append("loaded"))
    local = LocalBackend(make_settings(redis_url, model_backend="local"))
    with pytest.raises(ModelUnavailable, match=r"lacks avx2, fma, f16c, bmi2.*CPU requirements"):
        await local.start()
    await local.aclose()
    assert loaded == []  # llama.cpp was never loaded


@pytest.mark.usefixtures("avx_only_cpu")
async def test_the_cpu_check_follows_local_cpu_flags(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LocalBackend, "_load", lambda self: None)
    settings = make_settings(redis_url, model_backend="local", local_cpu_flags="avx")
    assert settings.local_cpu_flags == ["avx"]
    local = LocalBackend(settings)
    await local.start()  # an AVX-only build on an AVX-only CPU: no complaint
    await local.aclose()
