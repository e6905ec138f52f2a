"""A GGUF model run in the worker process by llama.cpp (llama-cpp-python).

Generation runs on one dedicated thread (the batch engine's decode loop), so the event loop keeps
serving Redis while the model works; tokens cross to the loop through a queue as they are
produced, one queue per reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from core.config import Settings
from core.models import Message
from worker.backends.base import ModelBackend, ModelError, ModelUnavailable, Usage
from worker.backends.batching import END, BatchEngine, EngineConfig, Generation
from worker.backends.model_file import model_file
from worker.prompt import chat_turns

logger = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")


def missing_cpu_flags(cpuinfo: str, required: Sequence[str]) -> list[str]:
    """The `required` flags that the first `flags` line of /proc/cpuinfo text lacks."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            present = set(value.split())
            return [flag for flag in required if flag not in present]
    return []  # no flags line (not Linux on x86): nothing to check against


def check_cpu(required: Sequence[str], cpuinfo: Path | None = None) -> None:
    """Fail at start, in words, when llama.cpp was built for instructions this CPU lacks.

    Without it, the worker loads fine and dies with SIGILL on the first message, which the
    user sees as a crash with no reason. Only x86-64 is checked: the flags are x86 names.
    """
    if not required or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        text = (cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    missing = missing_cpu_flags(text, required)
    if missing:
        raise ModelUnavailable(
            f"This CPU lacks {', '.join(missing)}, which the llama.cpp build needs "
            f"(LOCAL_CPU_FLAGS={','.join(required)}): rebuild llama-cpp-python for this "
            "machine (README 'CPU requirements': LLAMA_CMAKE_ARGS=... make install) and set "
            "LOCAL_CPU_FLAGS to match, or use MODEL_BACKEND=openai/huggingface"
        )


class LocalBackend(ModelBackend):
    """The local model with continuous batching: up to LOCAL_BATCH_SLOTS replies at once.

    All of them share one llama.cpp context and one decode per token (worker/backends/
    batching.py), so eight sessions get several times the tokens/s of one on a CPU.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # LOCAL_MODEL_PATH, else the default model's Q8_0 copy, found (or made) at start.
        self.model_path = settings.local_model_path
        self.max_concurrency = settings.local_batch_slots
        self._engine: BatchEngine | None = None
        self.size_prompt(settings, settings.local_context_tokens)
        # A slot's last cell is never filled: BatchEngine.submit takes at most this many.
        self.context_tokens -= 1

    async def start(self) -> None:
        path = self.model_path
        if path is not None and not path.is_file():
            raise ModelUnavailable(f"Local model file not found: {path}")
        check_cpu(self._settings.local_cpu_flags)  # before llama.cpp's code is ever loaded
        self._engine = await asyncio.to_thread(self._load)

    def _load(self) -> BatchEngine:
        if self.model_path is None:
            self.model_path = model_file(self._settings)
        engine = BatchEngine(
            EngineConfig(
                model_path=self.model_path,
                slots=self._settings.local_batch_slots,
                context_per_slot=self._settings.local_context_tokens,
                threads=self._settings.local_threads,
                batch_threads=self._settings.local_batch_threads,
                temperature=self._settings.model_temperature,
                max_new_tokens=self._settings.model_max_new_tokens,
            )
        )
        engine.load()
        logger.info("local model loaded: %s, %d slots", self.model_path.name, self.max_concurrency)
        return engine

    @property
    def active_slots(self) -> int:
        """Generations holding a slot now: what a stop must bring down at once."""
        return self._engine.active if self._engine is not None else 0

    async def aclose(self) -> None:
        # Ends generations still in flight (they get an error), off the loop.
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)

    def count_tokens(self, text: str) -> int:
        """The model's own tokenizer (the estimate before the model is loaded)."""
        if self._engine is None:
            return super().count_tokens(text)
        return len(self._engine.tokenize(text))

    def prompt_tokens(self, history: Sequence[Message]) -> int:
        """Exact: the prompt as the model gets it, chat template and system prompt included."""
        if self._engine is None:
            return super().prompt_tokens(history)
        return len(self._engine.tokenize_chat(chat_turns(history, self.system_prompt)))

    async def stream_reply(
        self, history: Sequence[Message], usage: Usage | None = None
    ) -> AsyncIterator[str]:
        engine = self._engine
        if engine is None:
            raise ModelUnavailable("The local model is not loaded")
        turns = chat_turns(self.fit(history), self._settings.system_prompt)
        usage = usage if usage is not None else Usage()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        ended = asyncio.Event()

        def receive(item: object) -> None:
            queue.put_nowait(item)
            if item is END or isinstance(item, BaseException):
                ended.set()

        def deliver(item: object) -> None:  # called on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(receive, item)

        try:
            generation = Generation(prompt=engine.tokenize_chat(turns), deliver=deliver)
            engine.submit(generation)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"The local model cannot answer: {exc}") from exc
        usage.prompt = len(generation.prompt)
        try:
            while (item := await queue.get()) is not END:
                if isinstance(item, Exception):
                    raise ModelError(f"The local model failed: {item}") from item
                assert isinstance(item, str)
                yield item
                # The caller asks for more: this piece is on its way (the engine holds its next
                # step for the first one; batching.BatchEngine._wait_for_first_pieces).
                generation.first_sent.set()
        finally:
            engine.cancel(generation)  # a stop or timeout frees the slot before the next step
            await asyncio.shield(ended.wait())
            usage.completion = generation.produced  # llama.cpp's count, final once it ended
