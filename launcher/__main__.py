"""`python -m launcher` (what `make run` runs): the whole service in the foreground.

Starts the embedded Redis (unless REDIS_URL names an external server), the server and
RUN_WORKERS workers, each a child process with its own logs on this terminal. A child that
dies is restarted with backoff (launcher/supervisor.py), the embedded Redis too (same port and
data folder: its append-only file brings the data back); nothing else is stopped because of it.
Ctrl+C (or SIGTERM) stops them in order: server and workers first, Redis last.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from core.config import Settings, get_settings
from core.logs import configure_logging
from launcher.redis_server import EmbeddedRedis, load_or_create_password
from launcher.supervisor import Supervised, Supervisor

logger = logging.getLogger("launcher")

STOP_TIMEOUT = 20.0


class Child:
    """`python -m <module>` in its own process group: a Ctrl+C reaches only the launcher,
    which stops the children in order (Redis last) instead of all of them at once."""

    def __init__(self, name: str, module: str, env: dict[str, str]) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logger.info("started %s (pid %d)", self.name, self.process.pid)

    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(max(0.1, timeout))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in time; killing it", self.name)
            self.process.kill()
            self.process.wait()


def stop_in_order(children: list[Child], embedded: EmbeddedRedis | None) -> None:
    """Server and workers first (they hand back their work through Redis), Redis last."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        child.wait(deadline - time.monotonic())
    logger.info("stopped the server and workers")
    if embedded is not None:
        logger.info("stopping the embedded Redis")
        embedded.stop()


def start_embedded_redis(settings: Settings) -> EmbeddedRedis:
    """The embedded Redis, with the password kept in its data folder (made once)."""
    embedded = EmbeddedRedis(
        settings.embedded_redis_port,
        settings.redis_data_dir,
        server_bin=settings.redis_server_bin,
        module=settings.redisjson_module,
        password=load_or_create_password(Path(settings.redis_data_dir)),
        maxmemory=settings.embedded_redis_maxmemory,
    )
    embedded.start()
    return embedded


def redis_unit(embedded: EmbeddedRedis) -> Supervised:
    def restart() -> None:
        logger.warning("restarting the embedded Redis on port %d", embedded.port)
        embedded.start()

    return Supervised("embedded Redis", restart, embedded.exit_status)


def worker_env(env: dict[str, str], settings: Settings, index: int) -> dict[str, str]:
    """Worker `index` (from 0) gets WORKER_METRICS_PORT + index: one port each."""
    if not settings.worker_metrics_port:
        return env
    return {**env, "WORKER_METRICS_PORT": str(settings.worker_metrics_port + index)}


def metrics_lines(settings: Settings) -> list[str]:
    """Where `make run`'s metrics are (docs/metrics.md), for the start-up log."""
    if not settings.metrics_enabled:
        lines = ["server metrics: off (METRICS_ENABLED=false)"]
    elif settings.server_metrics_port:
        lines = [f"server metrics: http://{settings.metrics_host}:{settings.server_metrics_port}/"]
    else:
        host = (
            "localhost"
            if settings.server_host in ("127.0.0.1", "0.0.0.0")
            else settings.server_host
        )
        lines = [f"server metrics: http://{host}:{settings.server_port}/metrics"]
    if not settings.worker_metrics_port:
        lines.append("worker metrics: off (set WORKER_METRICS_PORT to serve them)")
    for n in range(settings.run_workers if settings.worker_metrics_port else 0):
        port = settings.worker_metrics_port + n
        lines.append(f"worker {n + 1} metrics: http://{settings.metrics_host}:{port}/metrics")
    return lines


def main() -> int:
    settings = get_settings()
    configure_logging(settings.log_level)
    supervisor = Supervisor()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("got %s; stopping", signal.Signals(signum).name)
        supervisor.request_stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    embedded: EmbeddedRedis | None = None
    env = dict(os.environ)
    if "redis_url" in settings.model_fields_set:
        logger.info("using the Redis at REDIS_URL")
    else:
        embedded = start_embedded_redis(settings)
        env["REDIS_URL"] = embedded.url
    children = [Child("server", "server", env)]
    children += [
        Child(f"worker {n + 1}", "worker", worker_env(env, settings, n))
        for n in range(settings.run_workers)
    ]
    try:
        if embedded is not None:
            # Already started: registered so that its death is seen and healed.
            supervisor.units.append(redis_unit(embedded))
            supervisor.units[-1].started_at = time.monotonic()
        for child in children:
            supervisor.add(Supervised(child.name, child.start, child.exit_status))
        host = settings.server_host
        logger.info(
            "chat service starting: open http://%s:%d/ (Ctrl+C stops everything)",
            "localhost" if host in ("127.0.0.1", "0.0.0.0") else host,
            settings.server_port,
        )
        for line in metrics_lines(settings):
            logger.info("%s", line)
        supervisor.watch()
    finally:
        stop_in_order(children, embedded)
        logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
