"""Scale-out: throughput with 1, 2, 4 workers and 1, 2 servers when the model takes 200 ms.

`python -m bench.scaleout [--quick] [--sessions N] [--seconds S] [--delay D]`

The bench model server answers every request after a fixed delay, so a worker that keeps many
generations in flight (WORKER_CONCURRENCY; unset, the openai backend's default of 256) is not
limited by the model. N sessions, spread over the servers, each send their next message as soon
as the last one is answered. Ceiling for each layout: min(N, workers x WORKER_CONCURRENCY) /
delay replies/s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from bench.client import ChatSocket, LoadResult, closed_loop, new_sessions
from bench.support import (
    Bench,
    Table,
    command_line,
    machine_line,
    percentile,
    quiet_logging,
    ratio,
    run_as_program,
    stack_env,
)
from core.config import Settings
from worker.backends.openai_compat import ChatCompletionsBackend

# The openai backend's slots on default settings (WORKER_CONCURRENCY unset: its own default).
SLOTS = Settings(_env_file=None).worker_concurrency or ChatCompletionsBackend.default_concurrency


@dataclass(frozen=True)
class Options:
    sessions: int = 64
    seconds: float = 6.0
    delay: float = 0.2
    layouts: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2))


QUICK = Options(sessions=8, seconds=1.5, layouts=((1, 1),))


@dataclass
class Row:
    workers: int
    servers: int
    load: LoadResult

    def ceiling(self, options: Options) -> float:
        return min(options.sessions, self.workers * SLOTS) / options.delay


async def _drive(urls: Sequence[str], options: Options) -> LoadResult:
    tokens = await new_sessions(urls[0], options.sessions)
    sockets = [
        await ChatSocket.open(urls[i % len(urls)].replace("http://", "ws://"), token)
        for i, token in enumerate(tokens)
    ]
    try:
        return await closed_loop(sockets, options.seconds, warmup=2 * options.delay)
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


def run(options: Options) -> list[Row]:
    rows = []
    with Bench("scaleout") as bench:
        _model, model_url = bench.model_server(delay=options.delay)
        for workers, servers in options.layouts:
            env = stack_env(
                bench.redis.url,
                bench.new_prefix(),
                MODEL_BACKEND="openai",
                OPENAI_BASE_URL=model_url,
                MODEL_TIMEOUT_SECONDS="30",
            )
            started = [bench.worker(env) for _ in range(workers)]
            server_children = [bench.server(env) for _ in range(servers)]
            bench.wait_workers(started)
            load = asyncio.run(_drive([url for _, url in server_children], options))
            rows.append(Row(workers, servers, load))
            bench.stop_children(started + [child for child, _ in server_children])
    return rows


def table(rows: Sequence[Row], options: Options) -> Table:
    out = Table(
        f"Scale-out: model replies after {1000 * options.delay:.0f} ms, {options.sessions} "
        f"sessions, WORKER_CONCURRENCY={SLOTS}",
        ["workers", "servers", "replies/s", "p50 ms", "p99 ms", "errors", "ceiling/s",
         "vs ceiling", "vs 1 worker 1 server"],
    )  # fmt: skip
    base = rows[0].load.rate if rows else 0.0
    for row in rows:
        latencies = row.load.latencies_ms()
        ceiling = row.ceiling(options)
        out.add(
            row.workers,
            row.servers,
            row.load.rate,
            percentile(latencies, 0.5),
            percentile(latencies, 0.99),
            row.load.errors,
            ceiling,
            ratio(row.load.rate, ceiling),
            f"{row.load.rate / base:.2f}x" if base else "n/a",
        )
    out.notes.append(machine_line())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    options = command_line(__doc__, Options(), QUICK, ("sessions", "seconds", "delay"), argv)
    with quiet_logging():
        table(run(options), options).print()


if __name__ == "__main__":
    run_as_program(main)
