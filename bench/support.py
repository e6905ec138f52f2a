"""What every benchmark shares: child processes, the stack on loopback, stats and tables.

Everything binds to 127.0.0.1 on free ports and lives in a temporary folder; every process a
benchmark starts is stopped when its `with` block ends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import httpx
import redis

from core.heap import freeze_startup_heap
from launcher.redis_server import EmbeddedRedis, free_port

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    OptionsT = TypeVar("OptionsT", bound=DataclassInstance)
else:
    OptionsT = TypeVar("OptionsT")

__all__ = ["free_port"]  # re-exported for the benchmarks

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


# --- Statistics and tables ---------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def ratio(value: float, ceiling: float) -> str:
    if not ceiling or ceiling != ceiling or value != value:
        return "n/a"
    return f"{100 * value / ceiling:.1f}%"


@dataclass
class Table:
    """A Markdown table printed on stdout (the benchmark's result, not a log)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([_cell(cell) for cell in cells])

    def render(self) -> str:
        widths = [
            max(len(column), *(len(row[i]) for row in self.rows)) if self.rows else len(column)
            for i, column in enumerate(self.columns)
        ]
        lines = [f"### {self.title}", ""]
        lines.append(
            "| " + " | ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True)) + " |"
        )
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in self.rows:
            lines.append(
                "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
            )
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)

    def print(self) -> None:
        sys.stdout.write(self.render() + "\n\n")
        sys.stdout.flush()


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def machine_line() -> str:
    """One line describing the machine, for the tables' notes."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU(s) {cpu}; Python {platform.python_version()}; "
        f"{platform.system()} {platform.release()}; load average at the end {load}"
    )


# --- Processes ---------------------------------------------------------------------------------


def raise_open_files(wanted: int) -> int:
    """Raise this process's open-file limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the file)
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by some processes between `start()` and `stop()`, by name; with
    `redis_port`, also the commands Redis processed meanwhile (INFO stats), and the same split
    by command (INFO commandstats). Both count the commands a script calls as well as the
    EVALSHA that ran it: what Redis does, not only the round trips."""

    def __init__(self, pids: dict[str, int], redis_port: int | None = None) -> None:
        self.pids = pids
        self.redis_port = redis_port
        self._before: dict[str, float] = {}
        self._commands_before = 0
        self._by_command_before: dict[str, int] = {}
        self.used: dict[str, float] = {}
        self.redis_commands = 0
        self.redis_by_command: dict[str, int] = {}

    def _commands(self) -> tuple[int, dict[str, int]]:
        if self.redis_port is None:
            return 0, {}
        client = redis.Redis(port=self.redis_port)
        try:
            total = int(client.info("stats")["total_commands_processed"])
            stats = client.info("commandstats")
        finally:
            client.close()
        by_command = {
            name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()
        }
        return total, by_command

    def start(self) -> None:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._commands_before, self._by_command_before = self._commands()

    def stop(self) -> None:
        self.used = {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}
        total, by_command = self._commands()
        self.redis_commands = total - self._commands_before
        changed = {
            name: calls - self._by_command_before.get(name, 0) for name, calls in by_command.items()
        }
        # The meter's own INFO calls are not the pipeline's.
        self.redis_by_command = {
            name: calls for name, calls in changed.items() if calls > 0 and name != "info"
        }

    def per_command(self, messages: int) -> str:
        """The commands per message, most frequent first, as `NAME n.nn` text."""
        ranked = sorted(self.redis_by_command.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {calls / messages:.2f}" for name, calls in ranked)

    @property
    def total(self) -> float:
        return sum(self.used.values())


class Child:
    """A Python child process (`python -m module ...`) with its output in a log file.

    The benches and the multi-process tests (tests/support/processes.py) both start servers,
    workers and the launcher through it.
    """

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} never logged {text!r}:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is cleaned up by the process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl+C: SIGINT, then wait for the process to exit by itself; its exit code."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (SIGKILL after `timeout`); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def stack_env(redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a server or worker child: this Redis and prefix, quiet logs.

    Every load comes from 127.0.0.1, so the rate limits are set far above any bench's load
    rather than switched off: their checks still run (and cost what they cost) on every
    message, but never refuse one.
    """
    env = dict(os.environ)
    unlimited = str(10**9)
    env.update(
        {
            "REDIS_URL": redis_url,
            "KEY_PREFIX": key_prefix,
            "LOG_LEVEL": "WARNING",
            "WORKER_BLOCK_MS": "1000",
            "MODEL_MAX_RETRIES": "0",
            "RATE_LIMIT_SESSION_MESSAGES": unlimited,
            "RATE_LIMIT_ADDRESS_MESSAGES": unlimited,
            "RATE_LIMIT_TOKEN_REQUESTS": unlimited,
            "RATE_LIMIT_REFRESH_REQUESTS": unlimited,
            "RATE_LIMIT_STOP_REQUESTS": unlimited,
            "MAX_SOCKETS_PER_ADDRESS": unlimited,
        }
    )
    env.update(extra)
    return env


class Bench:
    """A temporary folder, an embedded Redis, and every child started through it.

    `with Bench() as bench:` ... all children and Redis are stopped on exit, even on errors.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.redis = EmbeddedRedis(free_port(), self._tmp / "redis")
        self.children: list[Child] = []

    @property
    def log_dir(self) -> Path:
        return self._tmp

    def __enter__(self) -> Self:
        self.redis.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_children(self.children)
        self.redis.stop()
        if exc is None and not os.environ.get("BENCH_KEEP_LOGS"):
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            logger.warning("process logs kept in %s", self._tmp)

    def new_prefix(self) -> str:
        return f"bench-{uuid.uuid4().hex[:8]}"

    def start(self, name: str, args: Sequence[str], env: dict[str, str]) -> Child:
        child = Child(name, args, env, self._tmp)
        self.children.append(child)
        return child

    def stop_children(self, children: Sequence[Child]) -> None:
        for child in reversed(list(children)):
            child.stop()
            with contextlib.suppress(ValueError):
                self.children.remove(child)

    def model_server(self, delay: float = 0.0, pieces: int = 3) -> tuple[Child, str]:
        """The instant (or fixed-delay) OpenAI-compatible model server; returns its base URL."""
        port = free_port()
        child = self.start(
            f"model-{port}",
            ["bench.model_server", "--port", str(port), "--delay", str(delay),
             "--pieces", str(pieces)],
            dict(os.environ),
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        child.wait_http(f"{url}/health")
        return child, f"{url}/v1"

    def server(self, env: dict[str, str], port: int | None = None) -> tuple[Child, str]:
        """`python -m server` on a free port; returns it and its http URL once ready."""
        port = port or free_port()
        child = self.start(f"server-{port}", ["server"], {**env, "SERVER_PORT": str(port)})
        url = f"http://127.0.0.1:{port}"
        child.wait_http(f"{url}/readyz")
        return child, url

    def worker(self, env: dict[str, str]) -> Child:
        """`python -m worker` (logging at INFO, which has no per-message lines)."""
        child = self.start(
            f"worker-{uuid.uuid4().hex[:6]}", ["worker"], {**env, "LOG_LEVEL": "INFO"}
        )
        return child

    def wait_workers(self, workers: Sequence[Child], timeout: float = 120.0) -> None:
        for worker in workers:
            worker.wait_for_log("ready:", timeout)


# --- A local model in a process of its own ----------------------------------------------------


def _serve_object(
    conn: Connection, factory: Callable[..., object], args: tuple[object, ...]
) -> None:
    """The spawned side of `Spawned`: build the object, answer calls until None, close it."""
    logging.basicConfig(level=logging.WARNING)
    target = factory(*args)
    try:
        while (request := conn.recv()) is not None:
            name, call_args = request
            try:
                conn.send((True, getattr(target, name)(*call_args)))
            except Exception as exc:  # the caller re-raises it
                conn.send((False, exc))
    finally:
        close = getattr(target, "close", None)
        if callable(close):
            close()


class Spawned:
    """An object built by `factory(*args)` in a spawned process of its own, and called there.

    For the benches' llama.cpp references (the direct decode, the model alone): a worker's
    process decodes with one llama.cpp context, and a second one decoding from another thread
    of the same process slows both down. llama.cpp's OpenMP runtime (libgomp) stops spinning
    at its barriers once a process holds more OpenMP threads than CPUs, and two contexts that
    each ran a multi-threaded step are that on two CPUs: every barrier of a step then sleeps
    on a futex (docs/benchmarks.md, "Issue 12, sixth pass").
    """

    def __init__(self, factory: Callable[..., object], *args: object) -> None:
        context = multiprocessing.get_context("spawn")  # a new interpreter, no llama state
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_object, args=(child, factory, args), daemon=True
        )
        self._process.start()
        child.close()

    def call(self, name: str, *args: object) -> object:
        """`name(*args)` on the object; its exception is raised here. EOFError: it died."""
        self._conn.send((name, args))
        ok, value = self._conn.recv()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the child is gone already
            self._conn.send(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


def redis_benchmark_xadd(port: int, requests: int, clients: int = 50) -> float | None:
    """XADD requests/s from `redis-benchmark` against the given Redis; None if absent."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    stream = f"bench-xadd-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(requests),
         "-q", "XADD", stream, "*", "token", "t", "id", "i"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    # The last line looks like "XADD bench-xadd-… * token t id i: 61349.69 requests per second".
    for line in reversed(result.stdout.replace("\r", "\n").splitlines()):
        if "requests per second" in line:
            return float(line.split(":")[-1].split()[0])
    logger.warning("redis-benchmark gave no result: %s", result.stderr.strip()[:500])
    return None


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    yield


def command_line(
    doc: str | None,
    default: OptionsT,
    quick: OptionsT,
    flags: Sequence[str],
    argv: Sequence[str] | None,
) -> OptionsT:
    """A bench's options: its defaults, or its `--quick` set, with the fields named in `flags`
    (numbers) overridden by `--name VALUE` on the command line."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    for name in flags:
        parser.add_argument(f"--{name}", type=type(getattr(default, name)))
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    return dataclasses.replace(quick if args.quick else default, **given)


def run_as_program(main: Callable[[], None]) -> None:
    """A load-generating bench's `__main__`: its own GC pauses would count as service latency,
    so the start-up heap is frozen (as the server and worker do) and the cyclic GC is off for
    the run."""
    freeze_startup_heap()
    gc.disable()
    main()
