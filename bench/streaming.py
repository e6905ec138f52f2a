"""Streaming with the local model: tokens/s the client receives against the model alone.

`python -m bench.streaming [--quick] [--rounds R] [--tokens M]`

Measures, R rounds, the same generation (same prompt, temperature 0, at most M tokens, the
worker's own llama.cpp settings) four ways:

- the model alone: llama-cpp-python's `create_chat_completion`, in a process of its own (one
  llama.cpp context decoding per process, as in a worker: bench.support.Spawned says why);
- the worker's backend alone: `LocalBackend` (the batch engine the worker runs) in this
  process, called as the worker calls it. This is the reference for the first token: the
  worker's model path, with nothing of the pipeline around it;
- through the whole stack: a new session over a real socket to `python -m server`, Redis and
  `python -m worker` with MODEL_BACKEND=local, timing the `token` events the client receives;
  once with coalesced token events (TOKEN_FLUSH_MS default) and once with TOKEN_FLUSH_MS=0
  (every model token its own PUBLISH), each its own worker.

Each round runs the four in a different order (rotated), so that none always runs right after
another: on two shared cores, what ran just before moves a first token by several ms.

Tokens/s = (tokens - 1) / (last token - first token); time to first token from the call (model,
backend) or from sending the message (client). A `token` event or a backend piece may hold
several model tokens, so tokens are counted by tokenizing the text with the model's tokenizer.
SPUBLISH calls per reply come from Redis's INFO commandstats. Medians over the rounds; the
first token added by the pipeline is the median of each round's (stack - backend alone).

The first token's own share of the pipeline is also measured per reply, paired: the client's
first token minus the worker's `chat_first_token_seconds` for that same reply (scraped from its
WORKER_METRICS_PORT before and after), which runs from the start of the worker's generation to
its first piece. What is left is the pipeline alone: the message's way to the worker, its read,
lease and history, and the first piece's way back. Unlike (stack - backend alone), it does not
carry the prefill's own variance from one run to the next (a few ms on two shared cores).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.client import ChatSocket, new_sessions
from bench.support import (
    Bench,
    Spawned,
    Table,
    command_line,
    free_port,
    machine_line,
    median,
    quiet_logging,
    ratio,
    run_as_program,
    stack_env,
)
from core.config import Settings
from core.models import Message, Source
from worker.backends import ModelBackend, create_backend
from worker.backends.batching import thread_counts
from worker.backends.model_file import model_file
from worker.prompt import chat_turns

PROMPT = "Write a short story about a lighthouse keeper and a cat."


@dataclass(frozen=True)
class Options:
    rounds: int = 5
    tokens: int = 200


QUICK = Options(rounds=1, tokens=16)


@dataclass
class Timing:
    first_token_ms: float
    tokens: int
    tokens_per_s: float
    ack_ms: float = float("nan")  # through the stack: the message stored, queued, announced
    events: int = 0  # through the stack: `token` events received
    publishes: int = 0  # through the stack: PUBLISH calls Redis ran meanwhile (all sessions)
    # Through the stack: the worker's own first token for this reply (chat_first_token_seconds).
    worker_first_ms: float = float("nan")

    @property
    def pipeline_first_ms(self) -> float:
        """The client's first token less the worker's: the pipeline's own share of it."""
        return self.first_token_ms - self.worker_first_ms


def _rate(tokens: int, first: float, last: float) -> float:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")


class ModelAlone:
    def __init__(self, settings: Settings) -> None:
        from llama_cpp import Llama

        self._settings = settings
        threads, batch_threads = thread_counts(settings.local_threads, settings.local_batch_threads)
        self._llm = Llama(
            model_path=str(model_file(settings)),
            n_ctx=settings.local_context_tokens,
            n_threads=threads,  # the worker's counts, not llama-cpp-python's defaults
            n_threads_batch=batch_threads,
            verbose=False,
        )
        history = [Message(source=Source.HUMAN, msg=PROMPT)]
        self._turns: Any = chat_turns(history, settings.system_prompt)

    def generate(self) -> Timing:
        # Forget the last prompt: llama-cpp-python would otherwise reuse its evaluated tokens
        # (the same prompt every round) and skip the prefill a new conversation pays.
        self._llm.reset()  # type: ignore[no-untyped-call]
        start = time.perf_counter()
        first = last = 0.0
        tokens = 0
        for chunk in self._llm.create_chat_completion(
            messages=self._turns,
            stream=True,
            max_tokens=self._settings.model_max_new_tokens,
            temperature=self._settings.model_temperature,
        ):
            delta: Any = chunk["choices"][0]["delta"]  # type: ignore[index]
            content = delta.get("content")
            if isinstance(content, str) and content:
                last = time.perf_counter()
                if not tokens:
                    first = last
                tokens += 1
        return Timing(1000 * (first - start), tokens, _rate(tokens, first, last))

    def close(self) -> None:
        self._llm.close()


class BackendAlone:
    """The worker's own local backend, in this process, on this process's event loop."""

    def __init__(self, settings: Settings) -> None:
        self._backend: ModelBackend = create_backend(settings)
        self._history = [Message(source=Source.HUMAN, msg=PROMPT)]

    async def start(self) -> None:
        await self._backend.start()

    async def generate(self) -> Timing:
        start = time.perf_counter()
        first = last = 0.0
        text: list[str] = []
        async for piece in self._backend.stream_reply(self._history):
            last = time.perf_counter()
            if not text:
                first = last
            text.append(piece)
        tokens = self.count_tokens("".join(text))
        return Timing(1000 * (first - start), tokens, _rate(tokens, first, last))

    def count_tokens(self, text: str) -> int:
        """With the model's own tokenizer (the same file the model alone loads)."""
        return self._backend.count_tokens(text)

    async def close(self) -> None:
        await self._backend.aclose()


def _publishes(redis_port: int) -> int:
    client = redis.Redis(port=redis_port)
    try:
        stats: Any = client.info("commandstats")
        return int(stats.get("cmdstat_spublish", {}).get("calls", 0))
    finally:
        client.close()


async def _first_token_seconds(metrics: httpx.AsyncClient) -> float:
    """The sum of the worker's `chat_first_token_seconds` histogram (all its replies so far)."""
    response = await metrics.get("/metrics")
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "chat_first_token_seconds_sum":
                return sample.value
    raise RuntimeError("the worker's /metrics has no chat_first_token_seconds_sum")


@dataclass(frozen=True)
class Stack:
    """One server and its worker, with the worker's /metrics."""

    http: str
    metrics: str
    redis_port: int


async def _through_stack(stack: Stack, count_tokens: Callable[[str], int]) -> Timing:
    (token,) = await new_sessions(stack.http, 1)
    chat = await ChatSocket.open(stack.http.replace("http://", "ws://"), token)
    before = _publishes(stack.redis_port)
    async with httpx.AsyncClient(base_url=stack.metrics) as metrics:
        worker_before = await _first_token_seconds(metrics)
        try:
            reply = await chat.ask(PROMPT)
        finally:
            await chat.close()
        worker_first = await _first_token_seconds(metrics) - worker_before
    if reply.error is not None or reply.first_token is None or reply.last_token is None:
        raise RuntimeError(f"the stack did not stream a reply: {reply.error}")
    tokens = count_tokens(reply.text)
    return Timing(
        1000 * (reply.first_token - reply.sent),
        tokens,
        _rate(tokens, reply.first_token, reply.last_token),
        1000 * (reply.acked - reply.sent) if reply.acked is not None else float("nan"),
        events=reply.tokens,
        publishes=_publishes(stack.redis_port) - before,
        worker_first_ms=1000 * worker_first,
    )


@dataclass
class Result:
    model: list[Timing]
    stack: list[Timing]  # coalesced (TOKEN_FLUSH_MS default)
    uncoalesced: list[Timing] = field(default_factory=list)  # TOKEN_FLUSH_MS=0
    backend: list[Timing] = field(default_factory=list)  # LocalBackend alone

    def added_first_token_ms(self, through: Sequence[Timing]) -> float:
        """The median over rounds of (first token through the stack - the backend alone)."""
        return median(
            [
                s.first_token_ms - b.first_token_ms
                for s, b in zip(through, self.backend, strict=True)
            ]
        )

    @staticmethod
    def pipeline_first_token_ms(through: Sequence[Timing]) -> float:
        """The median over rounds of the pipeline's own share of each reply's first token."""
        return median([t.pipeline_first_ms for t in through])


#: The pause before each step. A step that starts right after another one's last token is
#: slowed by it: the process that just decoded still has llama.cpp's OpenMP threads spinning
#: at their barrier for a while, on the same two cores.
SETTLE_SECONDS = 0.3


def _round(
    runner: asyncio.Runner, steps: Sequence[Callable[[], Coroutine[Any, Any, Timing]]], turn: int
) -> list[Timing]:
    """One round: every step once, starting at step `turn` (mod len); in the steps' order."""
    timings: dict[int, Timing] = {}
    for k in range(len(steps)):
        i = (turn + k) % len(steps)
        time.sleep(SETTLE_SECONDS)
        timings[i] = runner.run(steps[i]())
    return [timings[i] for i in range(len(steps))]


def run(options: Options) -> Result:
    overrides = {"MODEL_TEMPERATURE": "0", "MODEL_MAX_NEW_TOKENS": str(options.tokens)}
    settings = Settings(
        _env_file=None,
        model_backend="local",
        model_temperature=0,
        model_max_new_tokens=options.tokens,
    )
    result = Result([], [])
    with Bench("streaming") as bench, asyncio.Runner() as runner:
        stacks = []
        for flush in ({}, {"TOKEN_FLUSH_MS": "0"}):
            metrics_port = free_port()
            env = stack_env(
                bench.redis.url, bench.new_prefix(), MODEL_BACKEND="local", **overrides, **flush
            )
            worker = bench.worker({**env, "WORKER_METRICS_PORT": str(metrics_port)})
            http = bench.server(env)[1]
            bench.wait_workers([worker])
            stacks.append(Stack(http, f"http://127.0.0.1:{metrics_port}", bench.redis.port))
        model = Spawned(ModelAlone, settings)

        async def alone() -> Timing:
            timing = model.call("generate")
            assert isinstance(timing, Timing)
            return timing

        backend = BackendAlone(settings)
        runner.run(backend.start())
        steps = [
            alone,
            backend.generate,
            lambda: _through_stack(stacks[0], backend.count_tokens),
            lambda: _through_stack(stacks[1], backend.count_tokens),
        ]
        try:
            _round(runner, steps, 0)  # warm-up: every path's first reply
            for turn in range(options.rounds):
                timings = _round(runner, steps, turn)
                for into, timing in zip(
                    (result.model, result.backend, result.stack, result.uncoalesced),
                    timings,
                    strict=True,
                ):
                    into.append(timing)
        finally:
            runner.run(backend.close())
            model.close()
    return result


def table(result: Result, options: Options) -> Table:
    out = Table(
        f"Streaming: SmolLM2-135M (llama.cpp), temperature 0, up to {options.tokens} tokens, "
        f"median of {options.rounds} round(s)",
        ["measure", "tokens", "tokens/s", "first token ms", "vs model alone", "token events",
         "PUBLISH per reply"],
    )  # fmt: skip
    model_rate = median([t.tokens_per_s for t in result.model])
    model_first = median([t.first_token_ms for t in result.model])
    stack_rate = median([t.tokens_per_s for t in result.stack])
    stack_first = median([t.first_token_ms for t in result.stack])
    out.add("model alone (a process of its own)", median([t.tokens for t in result.model]),
            model_rate, model_first, "", "", "")  # fmt: skip
    out.add("worker's backend alone (LocalBackend, in-process)",
            median([t.tokens for t in result.backend]),
            median([t.tokens_per_s for t in result.backend]),
            median([t.first_token_ms for t in result.backend]), "", "", "")  # fmt: skip
    for name, timings in (
        ("client through the stack, coalesced (TOKEN_FLUSH_MS default)", result.stack),
        ("client through the stack, TOKEN_FLUSH_MS=0", result.uncoalesced),
    ):
        rate = median([t.tokens_per_s for t in timings])
        out.add(name, median([t.tokens for t in timings]), rate,
                median([t.first_token_ms for t in timings]), ratio(rate, model_rate),
                median([t.events for t in timings]),
                median([t.publishes for t in timings]))  # fmt: skip
    added = result.added_first_token_ms(result.stack)
    out.notes.append(
        f"goal: >= 95% of the model's tokens/s -> {ratio(stack_rate, model_rate)}; "
        f"< 5 ms added to the first token -> {added:.1f} ms (coalesced), "
        f"{result.added_first_token_ms(result.uncoalesced):.1f} ms (TOKEN_FLUSH_MS=0): "
        "median of each round's stack - backend alone"
    )
    out.notes.append(
        "the pipeline's own share of the first token, paired per reply (the client's first "
        "token - the worker's chat_first_token_seconds for it): "
        f"{result.pipeline_first_token_ms(result.stack):.1f} ms (coalesced), "
        f"{result.pipeline_first_token_ms(result.uncoalesced):.1f} ms (TOKEN_FLUSH_MS=0); "
        "per round: "
        + ", ".join(
            f"{s.pipeline_first_ms:.1f}/{u.pipeline_first_ms:.1f}"
            for s, u in zip(result.stack, result.uncoalesced, strict=True)
        )
    )
    out.notes.append(
        f"first token of the stack - the model alone (llama-cpp-python's own prompt path): "
        f"{stack_first - model_first:.1f} ms (medians)"
    )
    out.notes.append(
        "per round (first token ms, backend alone / stack / TOKEN_FLUSH_MS=0): "
        + ", ".join(
            f"{b.first_token_ms:.1f}/{s.first_token_ms:.1f}/{u.first_token_ms:.1f}"
            for b, s, u in zip(result.backend, result.stack, result.uncoalesced, strict=True)
        )
    )
    out.notes.append(
        f"of the stack's first token, {median([t.ack_ms for t in result.stack]):.1f} ms (median)"
        " pass before the client has the `ack` (server, Lua script, Pub/Sub back); the rest is"
        " the worker's read, lease, history, model and the token's way back"
    )
    out.notes.append(
        "per round (model / stack tokens/s): "
        + ", ".join(
            f"{m.tokens_per_s:.0f}/{s.tokens_per_s:.0f}"
            for m, s in zip(result.model, result.stack, strict=True)
        )
    )
    out.notes.append(machine_line())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    options = command_line(__doc__, Options(), QUICK, ("rounds", "tokens"), argv)
    with quiet_logging():
        table(run(options), options).print()


if __name__ == "__main__":
    run_as_program(main)
