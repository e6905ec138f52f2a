"""Batched local generation: aggregate tokens/s of 1 session against N concurrent sessions.

`python -m bench.batching [--quick] [--rounds R] [--tokens M] [--sessions N]`

Alternates, R times, four measurements with the same N prompts (temperature 0, at most M
tokens each, the worker's llama.cpp settings), all in this run:

- backend, 1 session: `LocalBackend.stream_reply` for one prompt, alone;
- backend, N sessions: N `stream_reply` calls at once (continuous batching, one decode a step);
- ceiling, 1 and N sequences: the same batched decode written directly against
  llama-cpp-python's low-level API (prefill each prompt, then one `llama_decode` per step for
  every unfinished sequence, greedy sampling), with no queue, thread hand-over or asyncio;
- through the stack, 1 and N sessions: the same prompts as chat messages over real sockets to
  `python -m server`, Redis and `python -m worker` with MODEL_BACKEND=local, each from a new
  session, timed from the first send to the last reply's end; tokens counted by tokenizing
  the replies' text with the model's tokenizer. This is what users get, the worker's event
  loop (Redis, token events) sharing the CPUs with the decode.

The ceiling runs in a process of its own, as a worker's model does (bench.support.Spawned
says why): with both contexts in this process, on a 2-CPU machine, 8 sequences decoded about
130 tokens/s in either of them instead of 220 (docs/benchmarks.md, "Issue 12, sixth pass").

Aggregate tokens/s = tokens produced by all sessions / wall time from the first request to the
last end (prefill included). The goal is N sessions >= 3x one session; the ceiling shows what
the CPU gives to the same batched decode without the backend around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.client import ChatSocket, new_sessions
from bench.support import (
    Bench,
    Spawned,
    Table,
    command_line,
    machine_line,
    median,
    quiet_logging,
    ratio,
    stack_env,
)
from core.config import Settings
from core.models import Message, Source
from worker.backends.batching import context_params
from worker.backends.local import LocalBackend
from worker.backends.model_file import model_file
from worker.prompt import chat_turns

TOPICS = ["a lighthouse", "a cat", "the sea", "a train", "a garden", "a robot", "winter", "a city"]


def prompt(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]}."


@dataclass(frozen=True)
class Options:
    rounds: int = 3
    tokens: int = 128
    sessions: int = 8


QUICK = Options(rounds=1, tokens=24, sessions=4)


@dataclass
class Run:
    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


async def _backend_run(backend: LocalBackend, sessions: int) -> Run:
    async def one(i: int) -> int:
        history = [Message(source=Source.HUMAN, msg=prompt(i))]
        return sum([1 async for _ in backend.stream_reply(history)])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(sessions)))
    return Run(sum(counts), time.perf_counter() - start)


class Ceiling:
    """The batched decode done directly with llama-cpp-python, as small as it can be."""

    def __init__(self, settings: Settings, slots: int) -> None:
        import llama_cpp
        from llama_cpp import _internals, _logger

        _logger.set_verbose(False)
        self._llama: Any = llama_cpp
        internals: Any = _internals
        self._internals = internals
        path = str(model_file(settings))
        params = llama_cpp.llama_model_default_params()
        self._model = internals.LlamaModel(path_model=path, params=params, verbose=False)
        # The worker's own context (KV streams, attention, LOCAL_THREADS, LOCAL_BATCH_THREADS).
        ctx = context_params(
            slots,
            settings.local_context_tokens,
            settings.local_threads,
            settings.local_batch_threads,
        )
        self._ctx = internals.LlamaContext(model=self._model, params=ctx, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
        self._settings = settings

    def _prompt_tokens(self, i: int) -> list[int]:
        turns = chat_turns(
            [Message(source=Source.HUMAN, msg=prompt(i))], self._settings.system_prompt
        )
        text = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)
        tokens: list[int] = self._model.tokenize(
            (text + "<|im_start|>assistant\n").encode(), add_bos=False, special=True
        )
        return tokens

    def run(self, sequences: int, max_tokens: int) -> Run:
        """Prefill each prompt, then one decode per step for every unfinished sequence."""
        llama, batch = self._llama, self._batch
        greedy = self._internals.LlamaSampler()
        greedy.add_greedy()
        pos, last, counts = [0] * sequences, [0] * sequences, [0] * sequences

        def keep(seq: int, token: int) -> bool:  # as the backend: a piece per non-EOG token
            if llama.llama_vocab_is_eog(self._model.vocab, token):
                return False
            counts[seq] += 1
            last[seq] = token
            return counts[seq] < max_tokens

        start = time.perf_counter()
        live = []
        for seq in range(sequences):
            tokens = self._prompt_tokens(seq)
            batch.reset()
            batch.add_sequence(tokens, seq, False)
            self._ctx.decode(batch)
            pos[seq] = len(tokens)
            if keep(seq, greedy.sample(self._ctx, len(tokens) - 1)):
                live.append(seq)
        while live:
            raw = batch.batch
            for j, seq in enumerate(live):
                raw.token[j], raw.pos[j], raw.seq_id[j][0] = last[seq], pos[seq], seq
                raw.n_seq_id[j], raw.logits[j] = 1, True
                pos[seq] += 1
            raw.n_tokens = len(live)
            self._ctx.decode(batch)
            live = [seq for j, seq in enumerate(live) if keep(seq, greedy.sample(self._ctx, j))]
        seconds = time.perf_counter() - start
        for seq in range(sequences):
            llama.llama_memory_seq_rm(self._ctx.memory, seq, -1, -1)
        greedy.close()
        return Run(sum(counts), seconds)

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()
        self._model.close()


class CeilingProcess:
    """The Ceiling in a process of its own (bench.support.Spawned), as a worker's model is."""

    def __init__(self, options: Options) -> None:
        self._spawned = Spawned(_ceiling, options)

    def run(self, sequences: int, max_tokens: int) -> Run:
        run = self._spawned.call("run", sequences, max_tokens)
        assert isinstance(run, Run)
        return run

    def close(self) -> None:
        self._spawned.close()


def _ceiling(options: Options) -> Ceiling:
    return Ceiling(bench_settings(options), options.sessions)


def bench_settings(options: Options) -> Settings:
    """The worker's settings (and LOCAL_* from the environment) with the bench's sampling."""
    return Settings(
        _env_file=None,
        model_temperature=0,
        model_max_new_tokens=options.tokens,
        local_batch_slots=options.sessions,
    )


@dataclass
class Result:
    backend_one: list[Run]
    backend_many: list[Run]
    ceiling_one: list[Run]
    ceiling_many: list[Run]
    stack_one: list[Run] = field(default_factory=list)
    stack_many: list[Run] = field(default_factory=list)

    def series(self) -> tuple[list[Run], ...]:
        """Every measurement's runs, in the per-round note's order."""
        return (
            self.backend_one,
            self.backend_many,
            self.ceiling_one,
            self.ceiling_many,
            self.stack_one,
            self.stack_many,
        )


async def _stack_run(http: str, sessions: int, count_tokens: Callable[[str], int]) -> Run:
    tokens = await new_sessions(http, sessions)
    ws = http.replace("http://", "ws://")
    chats = [await ChatSocket.open(ws, token) for token in tokens]
    try:
        start = time.perf_counter()
        replies = await asyncio.gather(*(chat.ask(prompt(i)) for i, chat in enumerate(chats)))
        seconds = time.perf_counter() - start
    finally:
        for chat in chats:
            await chat.close()
    failed = [reply.error for reply in replies if reply.error is not None]
    if failed:
        raise RuntimeError(f"the stack did not answer: {failed[0]}")
    return Run(sum(count_tokens(reply.text) for reply in replies), seconds)


def run(options: Options) -> Result:
    settings = bench_settings(options)
    result = Result([], [], [], [])
    with Bench("batching") as bench:
        env = stack_env(
            bench.redis.url,
            bench.new_prefix(),
            MODEL_BACKEND="local",
            MODEL_TEMPERATURE="0",
            MODEL_MAX_NEW_TOKENS=str(options.tokens),
            LOCAL_BATCH_SLOTS=str(options.sessions),
        )
        worker = bench.worker(env)
        http = bench.server(env)[1]
        bench.wait_workers([worker])
        ceiling = CeilingProcess(options)
        try:
            asyncio.run(_rounds(settings, options, ceiling, http, result))
        finally:
            ceiling.close()
    return result


async def _rounds(
    settings: Settings, options: Options, ceiling: CeilingProcess, http: str, result: Result
) -> None:
    backend = LocalBackend(settings)
    await backend.start()
    n = options.sessions
    try:
        await _backend_run(backend, 1)  # warm-up: every path's first reply
        ceiling.run(1, 8)
        await _stack_run(http, 1, backend.count_tokens)
        for _ in range(options.rounds):
            result.backend_one.append(await _backend_run(backend, 1))
            result.backend_many.append(await _backend_run(backend, n))
            result.ceiling_one.append(ceiling.run(1, options.tokens))
            result.ceiling_many.append(ceiling.run(n, options.tokens))
            result.stack_one.append(await _stack_run(http, 1, backend.count_tokens))
            result.stack_many.append(await _stack_run(http, n, backend.count_tokens))
    finally:
        await backend.aclose()


def table(result: Result, options: Options) -> Table:
    n = options.sessions
    out = Table(
        f"Batching: SmolLM2-135M (llama.cpp), temperature 0, up to {options.tokens} tokens, "
        f"1 vs {n} sessions, median of {options.rounds} round(s)",
        ["measure", "tokens", "seconds", "aggregate tokens/s", f"{n} vs 1", "vs ceiling"],
    )
    rows = [
        ("LocalBackend, 1 session", result.backend_one, result.backend_one, result.ceiling_one),
        (f"LocalBackend, {n} sessions", result.backend_many, result.backend_one,
         result.ceiling_many),
        ("ceiling (llama-cpp-python direct), 1 sequence", result.ceiling_one,
         result.ceiling_one, result.ceiling_one),
        (f"ceiling (llama-cpp-python direct), {n} sequences", result.ceiling_many,
         result.ceiling_one, result.ceiling_many),
        ("through the stack (server, Redis, worker), 1 session", result.stack_one,
         result.stack_one, result.ceiling_one),
        (f"through the stack (server, Redis, worker), {n} sessions", result.stack_many,
         result.stack_one, result.ceiling_many),
    ]  # fmt: skip
    for name, runs, base, ceiling in rows:
        rate = median([r.rate for r in runs])
        base_rate = median([r.rate for r in base])
        out.add(
            name,
            median([float(r.tokens) for r in runs]),
            median([r.seconds for r in runs]),
            rate,
            f"{rate / base_rate:.2f}x" if base_rate == base_rate and base_rate else "n/a",
            ratio(rate, median([r.rate for r in ceiling])),
        )
    many = median([r.rate for r in result.backend_many])
    one = median([r.rate for r in result.backend_one])
    out.notes.append(f"goal: {n} sessions >= 3x the aggregate tokens/s of 1 -> {many / one:.2f}x")
    stack_many = median([r.rate for r in result.stack_many])
    stack_one = median([r.rate for r in result.stack_one])
    out.notes.append(f"through the stack: {stack_many / stack_one:.2f}x")
    out.notes.append(
        "per round (backend 1 / backend N / ceiling 1 / ceiling N / stack 1 / stack N "
        "tokens/s): "
        + ", ".join(
            "/".join(f"{run.rate:.0f}" for run in runs)
            for runs in zip(*result.series(), strict=True)
        )
    )
    out.notes.append(
        "the backend in this process, the ceiling in a process of its own (one llama.cpp "
        "context decoding per process, as in a worker)"
    )
    out.notes.append(machine_line())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    options = command_line(__doc__, Options(), QUICK, ("rounds", "tokens", "sessions"), argv)
    with quiet_logging():
        table(run(options), options).print()


if __name__ == "__main__":
    main()
