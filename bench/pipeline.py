"""Pipeline throughput and latency with an instant model.

`python -m bench.pipeline [--quick] [--sessions N] [--seconds S]`

Starts an embedded Redis, the instant model server, `python -m server` and `python -m worker`
(MODEL_BACKEND=openai against it), opens N sessions over real sockets and measures:

1. saturation: every session sends its next message as soon as the last is answered
   (closed loop): messages/s;
2. latency at half of that load (open loop, a fixed offered rate): p50/p95/p99 from sending
   a message to receiving its final `message` event. The model answers at once, so this is
   what the pipeline adds.

Ceilings measured in the same run: the same N sockets against a bare WebSocket echo on the
same uvicorn stack (closed loop, and at the same offered rate), and `redis-benchmark XADD`
against the same Redis.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from bench.client import (
    Asker,
    ChatSocket,
    EchoSocket,
    LoadResult,
    closed_loop,
    new_sessions,
    open_loop,
)
from bench.support import (
    Bench,
    Table,
    free_port,
    machine_line,
    percentile,
    quiet_logging,
    ratio,
    redis_benchmark_xadd,
    stack_env,
)


@dataclass(frozen=True)
class Options:
    sessions: int = 32
    seconds: float = 8.0
    workers: int = 1
    pieces: int = 3
    xadd_requests: int = 100_000


QUICK = Options(sessions=4, seconds=1.5, xadd_requests=5_000)


@dataclass
class Result:
    echo_saturation: LoadResult
    echo_half: LoadResult
    pipeline_saturation: LoadResult
    pipeline_half: LoadResult
    xadd_per_s: float | None
    offered: float


async def _load(askers: Sequence[Asker], options: Options, rate: float | None) -> LoadResult:
    if rate is None:
        return await closed_loop(askers, options.seconds)
    return await open_loop(askers, rate, options.seconds)


async def _measure_echo(url: str, options: Options) -> LoadResult:
    sockets = [await EchoSocket.open(url) for _ in range(options.sessions)]
    try:
        return await closed_loop(sockets, options.seconds)
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


async def _measure_echo_at(url: str, options: Options, rate: float) -> LoadResult:
    sockets = [await EchoSocket.open(url) for _ in range(options.sessions)]
    try:
        return await open_loop(sockets, rate, options.seconds)
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


async def _measure_pipeline(http: str, options: Options) -> tuple[LoadResult, LoadResult]:
    ws = http.replace("http://", "ws://")
    tokens = await new_sessions(http, options.sessions)
    sockets = [await ChatSocket.open(ws, token) for token in tokens]
    try:
        saturation = await closed_loop(sockets, options.seconds)
        half = await open_loop(sockets, max(saturation.rate / 2, 1.0), options.seconds)
        return saturation, half
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


def run(options: Options) -> Result:
    with Bench("pipeline") as bench:
        xadd = redis_benchmark_xadd(bench.redis.port, options.xadd_requests)

        echo_port = free_port()
        echo = bench.start("echo", ["bench.echo_server", "--port", str(echo_port)], stack_env("", ""))
        echo.wait_http(f"http://127.0.0.1:{echo_port}/health")
        echo_url = f"ws://127.0.0.1:{echo_port}"
        echo_saturation = asyncio.run(_measure_echo(echo_url, options))

        _model, model_url = bench.model_server(pieces=options.pieces)
        env = stack_env(
            bench.redis.url, bench.new_prefix(), MODEL_BACKEND="openai", OPENAI_BASE_URL=model_url
        )
        workers = [bench.worker(env) for _ in range(options.workers)]
        _server, http = bench.server(env)
        bench.wait_workers(workers)
        pipeline_saturation, pipeline_half = asyncio.run(_measure_pipeline(http, options))
        offered = max(pipeline_saturation.rate / 2, 1.0)
        echo_half = asyncio.run(_measure_echo_at(echo_url, options, offered))
    return Result(echo_saturation, echo_half, pipeline_saturation, pipeline_half, xadd, offered)


def table(result: Result, options: Options) -> Table:
    out = Table(
        f"Pipeline: {options.sessions} sessions, instant model ({options.pieces} token events "
        f"per reply), {options.workers} worker, 1 server",
        ["measure", "messages/s", "p50 ms", "p95 ms", "p99 ms", "errors", "vs ceiling"],
    )

    def row(name: str, load: LoadResult, ceiling: float | None) -> None:
        latencies = load.latencies_ms()
        out.add(
            name,
            load.rate,
            percentile(latencies, 0.5),
            percentile(latencies, 0.95),
            percentile(latencies, 0.99),
            load.errors,
            ratio(load.rate, ceiling) if ceiling else "",
        )

    echo_rate = result.echo_saturation.rate
    row("ceiling: bare WebSocket echo, saturated", result.echo_saturation, None)
    row("pipeline, saturated", result.pipeline_saturation, echo_rate)
    row(f"echo at {result.offered:.0f} msg/s offered", result.echo_half, None)
    row(f"pipeline at {result.offered:.0f} msg/s offered (half)", result.pipeline_half, None)
    if result.xadd_per_s is None:
        out.add("ceiling: redis-benchmark XADD", "not installed", "", "", "", "", "")
    else:
        out.add(
            "ceiling: redis-benchmark XADD (-c 50)",
            result.xadd_per_s,
            "",
            "",
            "",
            "",
            "",
        )
        out.notes.append(
            f"pipeline messages/s are {ratio(result.pipeline_saturation.rate, result.xadd_per_s)} "
            "of the XADD rate (each message costs about a dozen Redis calls, see docs)"
        )
    p99 = percentile(result.pipeline_half.latencies_ms(), 0.99)
    out.notes.append(
        f"goal: pipeline >= 50% of echo -> {ratio(result.pipeline_saturation.rate, echo_rate)}; "
        f"p99 at half load < 10 ms -> {p99:.1f} ms"
    )
    out.notes.append(machine_line())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--sessions", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    options = QUICK if args.quick else Options()
    overrides = {
        name: getattr(args, name)
        for name in ("sessions", "seconds", "workers")
        if getattr(args, name) is not None
    }
    options = Options(**{**options.__dict__, **overrides})
    with quiet_logging():
        table(run(options), options).print()


if __name__ == "__main__":
    main()
