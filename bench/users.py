"""Users: N users x M messages against a remote model that answers after 200 ms, on defaults.

`python -m bench.users [--quick] [--users N] [--messages M] [--delay D] [--warm_up W]`

One server and one worker with MODEL_BACKEND=openai against the bench model server, default
settings except the rate limits every bench raises (bench.support.stack_env). Each user opens
a socket and sends its messages one after the other, each as soon as the previous one is
answered. Measured per WORKER_CONCURRENCY variant, in the same run: the old default (8) and
unset (the backend's own default, 256 for a remote API).

replies/s = delivered replies / wall time from the first send to the last reply. The ceiling
of this closed loop is N / delay replies/s (every user always waiting on the model).

Before the measured run, W other sessions (default 1) ask once, together, and close. With
one, the measured run starts with the worker's HTTP client made but one connection to the
model open, so the first burst of N messages also pays for opening N - 1 more (about 60 ms
of the first round on 2 cores); `--warm_up N` opens them first, as in a service that has been
running (docs/benchmarks.md, "Issue 12, third pass").
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.client import ChatSocket, Reply, new_sessions
from bench.pipeline import redis_pid
from bench.support import (
    Bench,
    CpuMeter,
    Table,
    command_line,
    machine_line,
    percentile,
    quiet_logging,
    ratio,
    run_as_program,
    stack_env,
)

OLD_DEFAULT = 8


@dataclass(frozen=True)
class Options:
    users: int = 50
    messages: int = 5
    delay: float = 0.2
    # Other sessions that ask once, together, before the measured run (see the docstring).
    warm_up: int = 1
    # WORKER_CONCURRENCY per variant; None = unset (the default).
    concurrency: tuple[int | None, ...] = (OLD_DEFAULT, None)

    @property
    def ceiling(self) -> float:
        return self.users / self.delay


QUICK = Options(users=4, messages=2, delay=0.05)


@dataclass
class Row:
    concurrency: int | None
    seconds: float
    replies: list[Reply] = field(default_factory=list)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cpu: dict[str, float] = field(default_factory=dict)
    redis_commands: int = 0

    @property
    def delivered(self) -> int:
        return sum(r.error is None and r.done is not None for r in self.replies)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    def latencies_ms(self) -> list[float]:
        return [1000 * r.latency for r in self.replies if r.error is None and r.done is not None]


async def _user(socket: ChatSocket, messages: int, start: asyncio.Event) -> list[Reply]:
    await start.wait()
    return [await socket.ask(f"message {i} of this user") for i in range(messages)]


async def _drive(http: str, options: Options, meter: CpuMeter) -> tuple[float, list[Reply]]:
    tokens = await new_sessions(http, options.users)
    ws = http.replace("http://", "ws://")
    sockets = [await ChatSocket.open(ws, token) for token in tokens]
    try:
        await _warm_up(http, options.warm_up)
        start = asyncio.Event()
        users = [asyncio.create_task(_user(s, options.messages, start)) for s in sockets]
        meter.start()
        began = time.perf_counter()
        start.set()
        async with asyncio.timeout(60 + 10 * options.messages * options.delay * options.users):
            results = await asyncio.gather(*users)
        seconds = time.perf_counter() - began
        meter.stop()
        return seconds, [reply for replies in results for reply in replies]
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


async def _warm_up(http: str, sessions: int) -> None:
    """`sessions` other sessions (at least one) ask once, together, and close."""
    ws = http.replace("http://", "ws://")
    tokens = await new_sessions(http, max(sessions, 1))
    sockets = [await ChatSocket.open(ws, token) for token in tokens]
    try:
        await asyncio.gather(*(s.ask("warm-up") for s in sockets))
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


def _env(redis_url: str, prefix: str, model_url: str, concurrency: int | None) -> dict[str, str]:
    env = stack_env(
        redis_url,
        prefix,
        MODEL_BACKEND="openai",
        OPENAI_BASE_URL=model_url,
        MODEL_TIMEOUT_SECONDS="30",
    )
    env.pop("WORKER_CONCURRENCY", None)  # unset means unset, whatever this shell has
    if concurrency is not None:
        env["WORKER_CONCURRENCY"] = str(concurrency)
    return env


def run(options: Options) -> list[Row]:
    rows = []
    with Bench("users") as bench:
        model, model_url = bench.model_server(delay=options.delay)
        for concurrency in options.concurrency:
            env = _env(bench.redis.url, bench.new_prefix(), model_url, concurrency)
            worker = bench.worker(env)
            server, http = bench.server(env)
            bench.wait_workers([worker])
            pids = {"server": server.pid, "worker": worker.pid, "model": model.pid}
            meter = CpuMeter({**pids, "redis": redis_pid(bench.redis.url)}, bench.redis.port)
            seconds, replies = asyncio.run(_drive(http, options, meter))
            row = Row(concurrency, seconds, replies, os.getloadavg(), meter.used)
            row.redis_commands = meter.redis_commands
            rows.append(row)
            bench.stop_children([worker, server])
    return rows


def table(rows: Sequence[Row], options: Options) -> Table:
    out = Table(
        f"Users: {options.users} users x {options.messages} messages, model replies after "
        f"{1000 * options.delay:.0f} ms, 1 server + 1 worker, default settings",
        ["WORKER_CONCURRENCY", "replies/s", "delivered", "p50 ms", "p95 ms", "p99 ms",
         "ceiling/s", "vs ceiling", "load avg (1 min)"],
    )  # fmt: skip
    wanted = options.users * options.messages
    for row in rows:
        latencies = row.latencies_ms()
        out.add(
            "unset (backend default)" if row.concurrency is None else str(row.concurrency),
            row.rate,
            f"{row.delivered}/{wanted}",
            percentile(latencies, 0.5),
            percentile(latencies, 0.95),
            percentile(latencies, 0.99),
            options.ceiling,
            ratio(row.rate, options.ceiling),
            f"{row.load[0]:.2f}",
        )
    out.notes.append(
        f"ceiling: {options.users} users each waiting {1000 * options.delay:.0f} ms per reply "
        f"= {options.ceiling:.0f} replies/s; goal >= 200 replies/s, p99 < 1 s, all delivered"
    )
    out.notes.append(
        f"warm-up: {max(options.warm_up, 1)} other session(s) asked once, together, before "
        "the measured run (--warm_up N: the model connections of N users open first)"
    )
    for row in rows:
        cpu = ", ".join(f"{name} {seconds:.2f}" for name, seconds in row.cpu.items())
        per_reply = row.redis_commands / row.delivered if row.delivered else float("nan")
        out.notes.append(
            f"WORKER_CONCURRENCY={row.concurrency or 'unset'}: {row.seconds:.2f} s wall, CPU "
            f"seconds {cpu}; Redis commands per reply {per_reply:.1f}"
        )
    out.notes.append(machine_line())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    flags = ("users", "messages", "delay", "warm_up")
    options = command_line(__doc__, Options(), QUICK, flags, argv)
    with quiet_logging():
        table(run(options), options).print()


if __name__ == "__main__":
    run_as_program(main)
