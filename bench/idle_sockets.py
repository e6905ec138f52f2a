"""How many idle chat sockets one server process holds, and its memory per socket.

`python -m bench.idle_sockets [--quick] [--sockets N]`

Starts an embedded Redis and one `python -m server` (no worker: idle sockets need none),
writes N sessions straight into Redis, and opens one socket per session from this process
(at most 200 handshakes at a time). Memory per socket = (server RSS with N sockets open - RSS
with none) / N, from VmRSS in /proc/<pid>/status. Then one socket sends a message and waits
for its `ack` (through Redis Pub/Sub), to show the server still serves with N sockets open.
It runs with permessage-deflate offered by the client (as browsers do) and without.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

from bench.client import gather_limited, open_socket, seed_sessions
from bench.support import (
    Bench,
    Table,
    command_line,
    machine_line,
    quiet_logging,
    raise_open_files,
    rss_kib,
    run_as_program,
    stack_env,
)
from core.keys import Keys

logger = logging.getLogger(__name__)

GOAL_SOCKETS = 10_000
GOAL_KIB = 40


@dataclass(frozen=True)
class Options:
    sockets: int = GOAL_SOCKETS
    concurrency: int = 200
    settle_seconds: float = 3.0
    compression: tuple[bool, ...] = (True, False)


QUICK = Options(sockets=200, settle_seconds=0.5, compression=(True,))


@dataclass
class Result:
    compression: bool
    opened: int
    failed: int
    open_seconds: float
    rss_before_kib: int
    rss_after_kib: int
    ack_ms: float | None

    @property
    def kib_per_socket(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.opened if self.opened else 0.0


async def _hold(
    ws_base: str, redis_url: str, prefix: str, pid: int, options: Options, compression: bool
) -> Result:
    redis = Redis.from_url(redis_url)
    try:
        tokens = await seed_sessions(redis, Keys(prefix), options.sockets)
    finally:
        await redis.aclose()
    # Warm up: the first sockets load code and fill caches that are not per-socket costs.
    for token in tokens[:5]:
        websocket = await open_socket(f"{ws_base}/chat?token={token}", compression)
        await websocket.close()
    await asyncio.sleep(options.settle_seconds)
    before = rss_kib(pid)

    failures: list[str] = []

    async def one(token: str) -> ClientConnection | None:
        try:
            return await open_socket(f"{ws_base}/chat?token={token}", compression)
        except Exception as exc:  # counted as failed, the run goes on
            failures.append(f"{type(exc).__name__}: {exc}")
            return None

    def opener(token: str) -> Callable[[], Awaitable[ClientConnection | None]]:
        return lambda: one(token)

    def closer(websocket: ClientConnection) -> Callable[[], Awaitable[None]]:
        return websocket.close

    started = time.perf_counter()
    sockets = await gather_limited([opener(t) for t in tokens], options.concurrency)
    open_seconds = time.perf_counter() - started
    if failures:
        logger.warning("%d socket(s) failed to open, first: %s", len(failures), failures[0])
    opened = [s for s in sockets if s is not None]
    try:
        await asyncio.sleep(options.settle_seconds)
        after = rss_kib(pid)
        ack_ms = None
        if opened:
            probe = opened[-1]
            sent = time.perf_counter()
            await probe.send("are you still there?")
            event = json.loads(await asyncio.wait_for(probe.recv(), timeout=30))
            if event.get("type") == "ack":
                ack_ms = 1000 * (time.perf_counter() - sent)
    finally:
        await gather_limited([closer(s) for s in opened], options.concurrency)
    return Result(
        compression, len(opened), len(sockets) - len(opened), open_seconds, before, after, ack_ms
    )


def run(options: Options) -> list[Result]:
    raise_open_files(2 * options.sockets + 1024)  # this process; the server inherits it
    results = []
    with Bench("idle") as bench:
        for compression in options.compression:
            prefix = bench.new_prefix()
            server, http = bench.server(stack_env(bench.redis.url, prefix))
            ws = http.replace("http://", "ws://")
            results.append(
                asyncio.run(_hold(ws, bench.redis.url, prefix, server.pid, options, compression))
            )
            bench.stop_children([server])
    return results


def table(results: Sequence[Result], options: Options) -> Table:
    out = Table(
        f"Idle sockets: {options.sockets:,} sessions, one socket each, on one server process",
        ["client offers", "open", "failed", "open time s", "RSS before MiB", "RSS after MiB",
         "KiB per socket", "ack with all open ms", "goal"],
    )  # fmt: skip
    for r in results:
        goal = (
            f"{'met' if r.opened >= GOAL_SOCKETS and r.kib_per_socket < GOAL_KIB else 'not met'}"
            f" ({GOAL_SOCKETS:,} under {GOAL_KIB} KiB)"
        )
        out.add(
            "permessage-deflate" if r.compression else "no compression",
            f"{r.opened:,}",
            r.failed,
            r.open_seconds,
            r.rss_before_kib / 1024,
            r.rss_after_kib / 1024,
            r.kib_per_socket,
            "no ack" if r.ack_ms is None else r.ack_ms,
            goal,
        )
    out.notes.append(machine_line())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    options = command_line(__doc__, Options(), QUICK, ("sockets",), argv)
    with quiet_logging():
        table(run(options), options).print()


if __name__ == "__main__":
    run_as_program(main)
