"""Pipeline throughput and latency with an instant model.

`python -m bench.pipeline [--quick] [--sessions N] [--seconds S] [--workers W] [--history H]`

Starts an embedded Redis, the instant model server, `python -m server` and `python -m worker`
(MODEL_BACKEND=openai against it), opens N sessions over real sockets and measures:

1. saturation: every session sends its next message as soon as the last is answered
   (closed loop): messages/s;
2. latency at half of that load (open loop, a fixed offered rate): p50/p95/p99 from sending
   a message to receiving its final `message` event. The model answers at once, so this is
   what the pipeline adds.

`--history H`: before both, each session is filled to about H messages through the same
sockets (H / 2 messages and their replies), so the cost per message is measured with histories
that long (MAX_HISTORY_MESSAGES is 1000); without it the histories start empty and grow during
the run.

Ceilings measured in the same run: the same N sockets against a bare WebSocket echo on the
same uvicorn stack (closed loop, and at the same offered rate), and `redis-benchmark XADD`
against the same Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from bench.client import (
    ChatSocket,
    EchoSocket,
    LoadResult,
    closed_loop,
    new_sessions,
    open_loop,
)
from bench.support import (
    Bench,
    CpuMeter,
    Table,
    command_line,
    free_port,
    machine_line,
    percentile,
    quiet_logging,
    ratio,
    redis_benchmark_xadd,
    run_as_program,
    stack_env,
)


@dataclass(frozen=True)
class Options:
    sessions: int = 32
    seconds: float = 8.0
    workers: int = 1
    pieces: int = 3
    xadd_requests: int = 100_000
    history: int = 0


QUICK = Options(sessions=4, seconds=1.5, xadd_requests=5_000)


@dataclass
class Measured:
    load: LoadResult
    cpu: CpuMeter

    @property
    def redis_per_message(self) -> float:
        done = len(self.load.ok)
        return self.cpu.redis_commands / done if done and self.cpu.redis_port else float("nan")

    @property
    def cpu_ms_per_message(self) -> float:
        done = len(self.load.ok)
        return 1000 * self.cpu.total / done if done else float("nan")


@dataclass
class Result:
    echo_saturation: Measured
    echo_half: Measured
    pipeline_saturation: Measured
    pipeline_half: Measured
    xadd_per_s: float | None
    offered: float


async def _measure_echo(url: str, options: Options, pid: int, rate: float | None) -> Measured:
    sockets = [await EchoSocket.open(url) for _ in range(options.sessions)]
    meter = CpuMeter({"echo server": pid})
    try:
        if rate is None:
            return Measured(await closed_loop(sockets, options.seconds, meter=meter), meter)
        return Measured(await open_loop(sockets, rate, options.seconds, meter=meter), meter)
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


async def _measure_pipeline(
    http: str, options: Options, pids: dict[str, int], redis_port: int
) -> tuple[Measured, Measured]:
    ws = http.replace("http://", "ws://")
    tokens = await new_sessions(http, options.sessions)
    sockets = [await ChatSocket.open(ws, token) for token in tokens]
    try:
        await _fill(sockets, options.history // 2)
        meter = CpuMeter(pids, redis_port)
        saturation = Measured(await closed_loop(sockets, options.seconds, meter=meter), meter)
        meter = CpuMeter(pids, redis_port)
        rate = max(saturation.load.rate / 2, 1.0)
        half = Measured(await open_loop(sockets, rate, options.seconds, meter=meter), meter)
        return saturation, half
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


async def _fill(sockets: Sequence[ChatSocket], messages: int) -> None:
    """Give each session `messages` messages and their replies, each socket asking in turn."""

    async def one(socket: ChatSocket) -> None:
        for _ in range(messages):
            reply = await socket.ask("hello bench")
            if reply.error is not None:
                raise RuntimeError(f"filling the history failed: {reply.error}")

    await asyncio.gather(*(one(s) for s in sockets))


def redis_pid(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def run(options: Options) -> Result:
    with Bench("pipeline") as bench:
        xadd = redis_benchmark_xadd(bench.redis.port, options.xadd_requests)

        echo_port = free_port()
        echo = bench.start(
            "echo", ["bench.echo_server", "--port", str(echo_port)], stack_env("", "")
        )
        echo.wait_http(f"http://127.0.0.1:{echo_port}/health")
        echo_url = f"ws://127.0.0.1:{echo_port}"
        echo_saturation = asyncio.run(_measure_echo(echo_url, options, echo.pid, None))

        model, model_url = bench.model_server(pieces=options.pieces)
        env = stack_env(
            bench.redis.url, bench.new_prefix(), MODEL_BACKEND="openai", OPENAI_BASE_URL=model_url
        )
        workers = [bench.worker(env) for _ in range(options.workers)]
        server, http = bench.server(env)
        bench.wait_workers(workers)
        pids = {
            "server": server.pid,
            **{f"worker {i + 1}": w.pid for i, w in enumerate(workers)},
            "redis": redis_pid(bench.redis.url),
            "model server": model.pid,
        }
        pipeline_saturation, pipeline_half = asyncio.run(
            _measure_pipeline(http, options, pids, bench.redis.port)
        )
        offered = max(pipeline_saturation.load.rate / 2, 1.0)
        echo_half = asyncio.run(_measure_echo(echo_url, options, echo.pid, offered))
    return Result(echo_saturation, echo_half, pipeline_saturation, pipeline_half, xadd, offered)


def table(result: Result, options: Options) -> Table:
    out = Table(
        f"Pipeline: {options.sessions} sessions"
        + (f" holding {options.history} messages each" if options.history else "")
        + f", instant model ({options.pieces} token events per reply), {options.workers} "
        "worker, 1 server",
        ["measure", "messages/s", "p50 ms", "p95 ms", "p99 ms", "errors", "CPU ms/msg",
         "Redis cmds/msg", "vs ceiling"],
    )  # fmt: skip

    def row(name: str, measured: Measured, ceiling: float | None) -> None:
        load = measured.load
        latencies = load.latencies_ms()
        out.add(
            name,
            load.rate,
            percentile(latencies, 0.5),
            percentile(latencies, 0.95),
            percentile(latencies, 0.99),
            load.errors,
            measured.cpu_ms_per_message,
            measured.redis_per_message,
            ratio(load.rate, ceiling) if ceiling else "",
        )

    echo_rate = result.echo_saturation.load.rate
    pipeline_rate = result.pipeline_saturation.load.rate
    row("ceiling: bare WebSocket echo, saturated", result.echo_saturation, None)
    row("pipeline, saturated", result.pipeline_saturation, echo_rate)
    row(f"echo at {result.offered:.0f} msg/s offered", result.echo_half, None)
    row(f"pipeline at {result.offered:.0f} msg/s offered (half)", result.pipeline_half, None)
    if result.xadd_per_s is None:
        out.add("ceiling: redis-benchmark XADD", "not installed", *[""] * 7)
    else:
        out.add("ceiling: redis-benchmark XADD (-c 50)", result.xadd_per_s, *[""] * 6,
                ratio(pipeline_rate, result.xadd_per_s))  # fmt: skip
    cpu = result.pipeline_saturation.cpu.used
    done = max(len(result.pipeline_saturation.load.ok), 1)
    out.notes.append(
        "CPU ms per message at saturation, by process: "
        + ", ".join(f"{name} {1000 * seconds / done:.2f}" for name, seconds in cpu.items())
    )
    out.notes.append(
        "Redis commands per message at saturation, by command (script calls included): "
        + result.pipeline_saturation.cpu.per_command(done)
    )
    echo_cpu = result.echo_saturation.cpu_ms_per_message
    pipeline_cpu = result.pipeline_saturation.cpu_ms_per_message
    p99 = percentile(result.pipeline_half.load.latencies_ms(), 0.99)
    out.notes.append(
        f"goal: pipeline >= 50% of echo messages/s -> {ratio(pipeline_rate, echo_rate)} "
        f"(by CPU per message, less sensitive to a loaded machine: "
        f"{ratio(echo_cpu, pipeline_cpu)}); p99 at half load < 10 ms -> {p99:.1f} ms"
    )
    out.notes.append(machine_line())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    options = command_line(
        __doc__, Options(), QUICK, ("sessions", "seconds", "workers", "history"), argv
    )
    with quiet_logging():
        table(run(options), options).print()


if __name__ == "__main__":
    run_as_program(main)
