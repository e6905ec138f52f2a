"""Continuous batching for the local model: several generations share one llama.cpp decode.

One thread owns the llama context. Each generation in flight is a sequence id (a slot): its
prompt is prefilled when it joins, then every step decodes one token for every active sequence
in a single `llama_decode`, so eight users cost little more than one on a CPU (the weights are
read once per step, not once per user). Requests join between steps; one that ends, or is
cancelled, drops its KV cells (`llama_memory_seq_rm`) and frees its slot before the next step.

The thread talks to the event loop only through callbacks scheduled with
`call_soon_threadsafe`: text pieces, then an end marker or an exception. The one thing the loop
tells the thread back is that a reply's first piece has been sent (`Generation.first_sent`).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cpus import physical_cores, usable_cpus

logger = logging.getLogger(__name__)

#: What the engine hands to a generation's callback: a text piece, an exception, or `END`.
END = object()
Deliver = Callable[[object], None]

#: The longest the decode loop holds its next step for a reply's first piece to be sent.
FIRST_PIECE_WAIT = 0.005


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    slots: int
    context_per_slot: int
    threads: int | None
    temperature: float
    max_new_tokens: int
    batch_threads: int | None = None
    first_piece_wait: float = FIRST_PIECE_WAIT


def thread_counts(threads: int | None, batch_threads: int | None) -> tuple[int, int]:
    """(threads for a step of one token, threads for a batch of several): llama.cpp uses the
    second for a prompt's prefill and for a step of several sequences. Unset, they are
    counted on the CPUs this process may use: one per physical core, and every CPU.

    A one-token step is bound by memory and by the barriers between its operations, so SMT
    siblings add little to it; llama-cpp-python's "half the cores" assumes two per core, and
    on a machine without SMT (most small VMs) it left one core of two idle: one session
    decoded 54 tokens/s where two threads give 85, and the first token waited behind the
    idle OpenMP thread's spin (docs/benchmarks.md, "Issue 12, sixth pass"). A prefill is
    compute-bound: one thread of two made the first token of a 34-token prompt take about
    220 ms instead of 117 (goal 3)."""
    cpus = usable_cpus()
    return threads or physical_cores(cpus), batch_threads or len(cpus)


def context_params(
    slots: int, context_per_slot: int, threads: int | None, batch_threads: int | None
) -> Any:
    """The llama.cpp context the engine decodes in (and the batching bench's ceiling too).

    Each sequence has a KV stream of its own (`kv_unified` off) of `context_per_slot` cells,
    and attention is flash attention. In one shared buffer, every sequence's attention ran over
    the cells of all of them, so a step of 8 cost about 8 x 8 times one sequence's attention;
    split, with flash attention, 8 sequences decode 2.9x the tokens/s of one instead of 2.5x
    (Q8_0; docs/benchmarks.md, goal 4).

    Only the engine thread decodes, and a process holds one such context: llama.cpp's OpenMP
    runtime (libgomp) spins at the barriers between a step's operations only while the
    process holds no more OpenMP threads than CPUs. Two contexts that each ran a step of
    several threads, from two threads of one process, are more: on 2 CPUs every barrier then
    sleeps on a futex, and 8 sequences decoded about 130 tokens/s instead of 220
    (docs/benchmarks.md, "Issue 12, sixth pass").
    """
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = context_per_slot * slots
    params.n_seq_max = slots
    params.kv_unified = False
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.n_batch = params.n_ubatch = 512
    params.n_threads, params.n_threads_batch = thread_counts(threads, batch_threads)
    params.no_perf = True
    return params


@dataclass(eq=False)
class Generation:
    """One request's state; only the engine thread touches the fields after `submit`."""

    prompt: list[int]
    deliver: Deliver
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by the receiving side once the first piece has gone on its way (or nobody waits).
    first_sent: threading.Event = field(default_factory=threading.Event)
    pieces: int = 0
    seq: int = -1
    pos: int = 0
    produced: int = 0
    next_token: int = -1
    sampler: Any = None
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )


class BatchEngine:
    """The llama.cpp model and context, and the decode loop that serves every slot."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._lock = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._active: list[Generation] = []
        self._first_pieces: list[Generation] = []  # delivered, maybe not sent yet
        self._closing = False
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._formatter: Any = None

    # --- Loading and closing (called from a worker thread, not the event loop) ---------------

    def load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals, _logger, llama_chat_format

        _logger.set_verbose(False)  # llama.cpp logs every graph build otherwise, per step
        model_params = llama_cpp.llama_model_default_params()
        self._model = _internals.LlamaModel(
            path_model=str(self.config.model_path), params=model_params, verbose=False
        )
        params = context_params(
            self.config.slots,
            self.config.context_per_slot,
            self.config.threads,
            self.config.batch_threads,
        )
        self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
        self._formatter = self._chat_formatter(llama_chat_format)
        self._thread = threading.Thread(target=self._run, name="llama-batch", daemon=True)
        self._thread.start()

    def _chat_formatter(self, llama_chat_format: Any) -> Any:
        """The GGUF's own chat template (ChatML for SmolLM2), as create_chat_completion uses."""
        template = self._model.metadata().get("tokenizer.chat_template")
        if not template:
            raise ValueError("the model file has no chat template")
        eos, bos = self._model.token_eos(), self._model.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self._model.token_get_text(bos) if bos != -1 else "",
        )

    def close(self) -> None:
        """Stop the loop (ending what is in flight) and free the context, then the model."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        for part in (self._batch, self._ctx, self._model):
            if part is not None:
                part.close()
        self._batch = self._ctx = self._model = None

    # --- Requests (any thread) -----------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Plain text's tokens (no special tokens parsed, no BOS)."""
        tokens: list[int] = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return tokens

    def tokenize_chat(self, turns: Sequence[Any]) -> list[int]:
        result = self._formatter(messages=list(turns))
        text: str = result.prompt
        tokens: list[int] = self._model.tokenize(
            text.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        return tokens

    def submit(self, generation: Generation) -> None:
        limit = self.config.context_per_slot - 1
        if len(generation.prompt) > limit:
            raise ValueError(
                f"the conversation is {len(generation.prompt)} tokens, more than the "
                f"{limit} a slot holds (LOCAL_CONTEXT_TOKENS)"
            )
        with self._lock:
            if self._closing:
                raise RuntimeError("the local model is shutting down")
            self._waiting.append(generation)
            self._lock.notify_all()

    def cancel(self, generation: Generation) -> None:
        generation.cancelled.set()
        generation.first_sent.set()  # nothing will be sent: do not hold a step for it
        with self._lock:
            self._lock.notify_all()

    @property
    def threads(self) -> tuple[int, int]:
        """The loaded context's (threads per one-token step, threads per batch), as llama.cpp
        reports them (read by tests)."""
        import llama_cpp

        return llama_cpp.llama_n_threads(self._ctx.ctx), llama_cpp.llama_n_threads_batch(
            self._ctx.ctx
        )

    @property
    def active(self) -> int:
        """Sequences holding a slot now (read by tests and the bench)."""
        return sum(1 for generation in list(self._active) if generation.seq >= 0)

    # --- The decode loop (the engine thread only) ---------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # a bug here must not leave coroutines waiting forever
            logger.exception("the local decode loop failed")
            with self._lock:
                self._closing = True
            for generation in [*self._active, *self._waiting]:
                self._finish(generation, exc)

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._active and not self._waiting:
                    self._lock.wait()
                if self._closing:
                    break
                dropped = [g for g in self._waiting if g.cancelled.is_set()]
                for generation in dropped:
                    self._waiting.remove(generation)
                held = {g.seq for g in self._active}
                free = [s for s in range(self.config.slots) if s not in held]
                joining = []
                while self._waiting and free:
                    generation = self._waiting.popleft()
                    generation.seq = free.pop(0)
                    joining.append(generation)
            for generation in dropped:
                self._finish(generation, END)
            for generation in joining:
                self._join(generation)
            self._step()
            self._active = [g for g in self._active if g.seq >= 0]
        for generation in [*self._active, *self._waiting]:
            self._finish(generation, RuntimeError("the local model was shut down"))

    def _join(self, generation: Generation) -> None:
        """Prefill the prompt of a new sequence and sample its first token."""
        if generation.cancelled.is_set():
            self._finish(generation, END)
            return
        generation.sampler = self._new_sampler()
        try:
            prompt = generation.prompt
            for start in range(0, len(prompt), 512):
                chunk = prompt[start : start + 512]
                self._batch.reset()
                for i, token in enumerate(chunk):
                    self._add(token, start + i, generation.seq, i == len(chunk) - 1)
                self._ctx.decode(self._batch)
            generation.pos = len(prompt)
            self._active.append(generation)
            self._sample(generation, self._batch.n_tokens() - 1)
        except Exception as exc:
            self._finish(generation, exc)

    def _step(self) -> None:
        """One decode for every active sequence's pending token, then one sample each."""
        self._wait_for_first_pieces()
        running = []
        for generation in self._active:
            if generation.seq < 0:
                continue
            if generation.cancelled.is_set():
                self._finish(generation, END)
            else:
                running.append(generation)
        if not running:
            return
        self._batch.reset()
        for generation in running:
            self._add(generation.next_token, generation.pos, generation.seq, True)
            generation.pos += 1
        try:
            self._ctx.decode(self._batch)
        except Exception as exc:
            for generation in running:
                self._finish(generation, exc)
            return
        for index, generation in enumerate(running):
            self._sample(generation, index)

    def _wait_for_first_pieces(self) -> None:
        """Hold the next step until the replies whose first piece was just delivered have sent
        it, for at most `first_piece_wait` in all.

        A step's threads take every core the moment it starts (a thread per core, spinning at
        the barriers between its operations), and the first piece still has its way to go: the
        worker's event loop, then Redis, then the server, each woken on a core the step holds,
        and each waiting for the scheduler to preempt a decode thread. That wait added 3 to
        10 ms to the first token on two cores; the user waits for that token, not for the
        second one, which a step of ~12 ms later brings anyway (docs/benchmarks.md, "Issue
        12, seventh pass"). Bounded, so a busy loop costs the batch a few ms once per reply.
        """
        waiting, self._first_pieces = self._first_pieces, []
        deadline = time.monotonic() + self.config.first_piece_wait
        for generation in waiting:
            generation.first_sent.wait(max(0.0, deadline - time.monotonic()))

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch.batch
        j = batch.n_tokens
        batch.token[j] = token
        batch.pos[j] = pos
        batch.seq_id[j][0] = seq
        batch.n_seq_id[j] = 1
        batch.logits[j] = logits
        batch.n_tokens = j + 1

    def _sample(self, generation: Generation, index: int) -> None:
        """Sample the next token from output `index`; hand its text over or end the reply."""
        import llama_cpp

        token = generation.sampler.sample(self._ctx, index)
        if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
            self._finish(generation, END)
            return
        piece = generation.decoder.decode(self._piece(token))
        if piece:
            generation.deliver(piece)
            if not generation.pieces:
                self._first_pieces.append(generation)
            generation.pieces += 1
        generation.produced += 1
        generation.next_token = token
        full = generation.pos + 1 >= self.config.context_per_slot
        if generation.produced >= self.config.max_new_tokens or full:
            self._finish(generation, END)

    def _piece(self, token: int) -> bytes:
        """The token's bytes (a multi-byte character may span tokens: the decoder joins them)."""
        import ctypes

        import llama_cpp

        buf = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, 64, 0, False)
        return buf.raw[: max(size, 0)]

    def _new_sampler(self) -> Any:
        """Each sequence its own chain, the same one create_chat_completion builds."""
        from llama_cpp import _internals

        internals: Any = _internals  # the wrappers are untyped
        sampler = internals.LlamaSampler()
        temperature = self.config.temperature
        if temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(40)
            sampler.add_top_p(0.95, 1)
            sampler.add_min_p(0.05, 1)
            sampler.add_temp(temperature)
            sampler.add_dist(random.randrange(1 << 31))
        return sampler

    def _finish(self, generation: Generation, last: object) -> None:
        """Free the slot and KV cells now, then tell the waiting coroutine."""
        import llama_cpp

        if generation.seq >= 0 and self._ctx is not None:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, generation.seq, -1, -1)
        generation.seq = -1
        if generation.sampler is not None:
            generation.sampler.close()
            generation.sampler = None
        if last is END:
            tail = generation.decoder.decode(b"", final=True)
            if tail:
                generation.deliver(tail)
        with contextlib.suppress(Exception):
            generation.deliver(last)
