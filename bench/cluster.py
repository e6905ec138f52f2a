"""Redis Cluster: the same load on one Redis and on a 3-master Redis Cluster, in one run.

`python -m bench.cluster [--quick] [--sessions N] [--seconds S]`

Starts one embedded Redis, then a 3-master EmbeddedCluster from the same binary
(launcher/redis_cluster.py), and runs the same load on each: the instant model (the bench
model server with no delay), 1 server, 2 workers, N sessions in a closed loop (96 and 480 as
two rows; `--sessions N` for one row). Every session comes from an address of its own as the
server sees it (X-Forwarded-For, trusted from 127.0.0.1 through FORWARDED_ALLOW_IPS), as behind
a proxy: the per-address limit key is not partitioned, and one address for all would make it one
hot key on one master.

Per layout: replies/s; per master, over the measured window, Redis commands per message (INFO
commandstats, the meter's own INFO left out, commands a script calls counted) and Redis CPU ms
per message (INFO cpu, user + system); how evenly commands and keys (DBSIZE at the end of the
window; every node is flushed before each row) spread over the masters, as each master's
deviation from the mean (goal: within ±20%).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import redis

from bench.client import ChatSocket, LoadResult, closed_loop, new_sessions
from bench.support import (
    Bench,
    Table,
    command_line,
    cpu_seconds,
    machine_line,
    percentile,
    quiet_logging,
    raise_open_files,
    run_as_program,
    stack_env,
)
from launcher.redis_cluster import EmbeddedCluster, free_port_range

MASTERS = 3
WORKERS = 2
DEFAULT_SESSIONS = (96, 480)
GOAL_DEVIATION = 20.0  # % from the mean, per master
IDLE_SECONDS = 1.0


@dataclass(frozen=True)
class Options:
    #: 0: two rows per layout, DEFAULT_SESSIONS; else one row of this many sessions.
    sessions: int = 0
    seconds: float = 8.0
    warmup: float = 1.5

    @property
    def session_counts(self) -> tuple[int, ...]:
        return (self.sessions,) if self.sessions else DEFAULT_SESSIONS


QUICK = Options(sessions=8, seconds=1.5, warmup=0.5)


def client_address(i: int) -> str:
    """The i-th session's address in 10.0.0.0/8 (10.0.0.1, 10.0.0.2, ...): one per session."""
    n = (i + 1) % 2**24
    return f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}"


def forwarded_for(i: int) -> dict[str, str]:
    return {"X-Forwarded-For": client_address(i)}


@contextlib.contextmanager
def _node(port: int) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


@dataclass
class NodeSample:
    commands: int
    cpu: float
    by_command: dict[str, int]


def _sample(port: int) -> NodeSample:
    with _node(port) as client:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
    by_command = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"  # the meter's own (and any readiness probe's) INFO
    }
    used = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return NodeSample(sum(by_command.values()), used, by_command)


@dataclass
class NodeUsage:
    """One master over the measured window."""

    port: int
    commands: int = 0
    cpu: float = 0.0
    by_command: dict[str, int] = field(default_factory=dict)
    keys: int = 0


class NodesMeter:
    """Per Redis node: commands and CPU seconds between `start()` and `stop()`, and DBSIZE at
    `stop()`; and the CPU seconds of the service's processes (server, workers) meanwhile."""

    def __init__(self, ports: Sequence[int], pids: dict[str, int]) -> None:
        self.ports = list(ports)
        self.pids = pids
        self._before: dict[int, NodeSample] = {}
        self._pids_before: dict[str, float] = {}
        self.nodes: list[NodeUsage] = []
        self.processes: dict[str, float] = {}

    def start(self) -> None:
        self._pids_before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._before = {port: _sample(port) for port in self.ports}

    def stop(self) -> None:
        after = {port: _sample(port) for port in self.ports}
        self.processes = {
            name: cpu_seconds(pid) - self._pids_before[name] for name, pid in self.pids.items()
        }
        self.nodes = []
        for port in self.ports:
            before, now = self._before[port], after[port]
            changed = {
                name: calls - before.by_command.get(name, 0)
                for name, calls in now.by_command.items()
            }
            with _node(port) as client:
                keys = int(client.dbsize())
            self.nodes.append(
                NodeUsage(
                    port,
                    now.commands - before.commands,
                    now.cpu - before.cpu,
                    {name: calls for name, calls in changed.items() if calls > 0},
                    keys,
                )
            )


@dataclass
class Row:
    layout: str
    sessions: int
    load: LoadResult
    meter: NodesMeter
    #: The same stack with its sockets open and no messages, for IDLE_SECONDS.
    idle: NodesMeter

    @property
    def messages(self) -> int:
        return len(self.load.ok)

    def per_message(self, value: float) -> float:
        return value / self.messages if self.messages else float("nan")

    @property
    def commands(self) -> int:
        return sum(node.commands for node in self.meter.nodes)

    @property
    def redis_cpu(self) -> float:
        return sum(node.cpu for node in self.meter.nodes)

    def by_command(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for node in self.meter.nodes:
            for name, calls in node.by_command.items():
                total[name] = total.get(name, 0) + calls
        return total


def deviations(values: Sequence[float]) -> list[float]:
    """Each value's deviation from the mean of all, in % of the mean (0 for one value)."""
    mean = sum(values) / len(values) if values else 0.0
    return [100 * (v - mean) / mean if mean else float("nan") for v in values]


async def _drive(
    http: str, sessions: int, options: Options, meter: NodesMeter, idle: NodesMeter
) -> LoadResult:
    """Opens the sessions; meters the idle stack for IDLE_SECONDS; sends one message on every
    socket at once (the pipeline primed: the slowest of these replies is about one round of the
    closed loop), then the closed loop, metered after a warm-up of at least that round."""
    tokens = await new_sessions(http, sessions, headers=forwarded_for)
    ws = http.replace("http://", "ws://")
    sockets = [
        await ChatSocket.open(ws, token, headers=forwarded_for(i)) for i, token in enumerate(tokens)
    ]
    try:
        idle.start()
        await asyncio.sleep(IDLE_SECONDS)
        idle.stop()
        started = time.perf_counter()
        await asyncio.gather(*(s.ask("hello bench") for s in sockets))
        warmup = max(options.warmup, time.perf_counter() - started)
        return await closed_loop(sockets, options.seconds, warmup=warmup, meter=meter)
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


def _flush(ports: Sequence[int]) -> None:
    for port in ports:
        with _node(port) as client:
            client.flushall()


def _measure(
    bench: Bench, layout: str, url: str, ports: Sequence[int], model_url: str, options: Options
) -> list[Row]:
    rows = []
    for sessions in options.session_counts:
        _flush(ports)
        env = stack_env(
            url,
            bench.new_prefix(),
            MODEL_BACKEND="openai",
            OPENAI_BASE_URL=model_url,
            FORWARDED_ALLOW_IPS="127.0.0.1",
        )
        workers = [bench.worker(env) for _ in range(WORKERS)]
        server, http = bench.server(env)
        bench.wait_workers(workers)
        pids = {"server": server.pid, **{f"worker {i + 1}": w.pid for i, w in enumerate(workers)}}
        meter, idle = NodesMeter(ports, pids), NodesMeter(ports, pids)
        load = asyncio.run(_drive(http, sessions, options, meter, idle))
        rows.append(Row(layout, sessions, load, meter, idle))
        bench.stop_children([*workers, server])
    return rows


def run(options: Options) -> list[Row]:
    raise_open_files(4 * max(options.session_counts) + 1024)
    rows: list[Row] = []
    with Bench("cluster") as bench:
        _model, model_url = bench.model_server(delay=0.0)
        rows += _measure(bench, "1 Redis", bench.redis.url, [bench.redis.port], model_url, options)
        bench.redis.stop()  # idle from here on; out of the cluster's way
        with EmbeddedCluster(
            free_port_range(MASTERS), bench.log_dir / "cluster", masters=MASTERS
        ) as cluster:
            ports = [node.port for node in cluster.masters]
            rows += _measure(bench, f"{MASTERS} masters", cluster.url, ports, model_url, options)
    return rows


def table(rows: Sequence[Row], options: Options) -> Table:
    out = Table(
        f"Redis Cluster: 1 Redis vs {MASTERS} masters, instant model, 1 server, {WORKERS} "
        f"workers, closed loop, {options.seconds:g} s measured",
        ["layout", "sessions", "node", "replies/s", "p50 ms", "p99 ms", "errors",
         "Redis cmds/msg", "Redis CPU ms/msg", "cmds vs mean", "keys", "keys vs mean"],
    )  # fmt: skip
    worst: list[str] = []
    for row in rows:
        latencies = row.load.latencies_ms()
        nodes = row.meter.nodes
        out.add(
            row.layout,
            row.sessions,
            "all" if len(nodes) > 1 else f":{nodes[0].port}" if nodes else "",
            row.load.rate,
            percentile(latencies, 0.5),
            percentile(latencies, 0.99),
            row.load.errors,
            row.per_message(row.commands),
            row.per_message(1000 * row.redis_cpu),
            "",
            sum(node.keys for node in nodes),
            "",
        )
        if len(nodes) < 2:
            continue
        command_spread = deviations([node.commands for node in nodes])
        key_spread = deviations([node.keys for node in nodes])
        for node, commands, keys in zip(nodes, command_spread, key_spread, strict=True):
            out.add("", "", f":{node.port}", "", "", "", "",
                    row.per_message(node.commands), row.per_message(1000 * node.cpu),
                    f"{commands:+.1f}%", node.keys, f"{keys:+.1f}%")  # fmt: skip
        widest_commands = max(abs(d) for d in command_spread)
        widest_keys = max(abs(d) for d in key_spread)
        met = widest_commands <= GOAL_DEVIATION and widest_keys <= GOAL_DEVIATION
        worst.append(
            f"{row.sessions} sessions: commands within ±{widest_commands:.1f}%, keys within "
            f"±{widest_keys:.1f}% -> {'met' if met else 'not met'}"
        )
    out.notes.append(
        "every session from its own address (X-Forwarded-For, FORWARDED_ALLOW_IPS=127.0.0.1), "
        "so the per-address limit keys spread like any unpartitioned key; rate limits set far "
        "above the load (their checks still run on every message; a limit's key then expires "
        "within a millisecond, so DBSIZE counts the sessions' keys, not the addresses')"
    )
    if worst:
        out.notes.append(
            f"spread over the masters, goal each within ±{GOAL_DEVIATION:.0f}% of the mean: "
            + "; ".join(worst)
        )
    for row in rows:
        ranked = sorted(row.by_command().items(), key=lambda item: -item[1])[:8]
        service = ", ".join(
            f"{name} {row.per_message(1000 * seconds):.2f}"
            for name, seconds in row.meter.processes.items()
        )
        out.notes.append(
            f"{row.layout}, {row.sessions} sessions: CPU ms per message {service}; most "
            "frequent Redis commands per message "
            + ", ".join(f"{name} {row.per_message(calls):.2f}" for name, calls in ranked)
        )
    for row in rows:
        out.notes.append(
            f"{row.layout}, {row.sessions} sessions, idle (sockets open, no messages) for "
            f"{IDLE_SECONDS:g} s: Redis CPU ms/s and commands/s per node "
            + ", ".join(
                f":{node.port} {1000 * node.cpu / IDLE_SECONDS:.1f} / "
                f"{node.commands / IDLE_SECONDS:.0f}"
                for node in row.idle.nodes
            )
        )
    out.notes.append(machine_line())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    options = command_line(__doc__, Options(), QUICK, ("sessions", "seconds"), argv)
    with quiet_logging():
        table(run(options), options).print()


if __name__ == "__main__":
    run_as_program(main)
