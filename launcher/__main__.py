"""`python -m launcher` (what `make run` runs): the whole service in the foreground.

Starts the embedded Redis (unless REDIS_URL names an external server; a local Redis Cluster
instead with REDIS_CLUSTER_SIZE >= 3, launcher/redis_cluster.py), the server and
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
from core.cpus import physical_cores, usable_cpus
from core.logs import configure_logging
from launcher.redis_cluster import EmbeddedCluster
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


def stop_in_order(children: list[Child], embedded: EmbeddedRedis | EmbeddedCluster | None) -> None:
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


def cluster_data_dir(settings: Settings) -> Path:
    """`cluster-<masters>x<replicas>` under REDIS_DATA_DIR: never the single Redis's files,
    and another shape of cluster gets its own folder instead of failing on this one's."""
    shape = f"cluster-{settings.redis_cluster_size}x{settings.redis_cluster_replicas}"
    return Path(settings.redis_data_dir) / shape


def start_embedded_cluster(settings: Settings) -> EmbeddedCluster:
    """The local Redis Cluster on EMBEDDED_REDIS_PORT and the ports after it, its password
    kept in its own data folder (made once)."""
    data_dir = cluster_data_dir(settings)
    cluster = EmbeddedCluster(
        settings.embedded_redis_port,
        data_dir,
        masters=settings.redis_cluster_size,
        replicas=settings.redis_cluster_replicas,
        server_bin=settings.redis_server_bin,
        module=settings.redisjson_module,
        password=load_or_create_password(data_dir),
        maxmemory=settings.embedded_redis_maxmemory,
    )
    cluster.start()
    return cluster


def redis_unit(embedded: EmbeddedRedis, name: str = "embedded Redis") -> Supervised:
    def restart() -> None:
        logger.warning("restarting the %s on port %d", name, embedded.port)
        embedded.start()

    return Supervised(name, restart, embedded.exit_status)


def redis_units(embedded: EmbeddedRedis | EmbeddedCluster) -> list[Supervised]:
    """One unit per Redis process: a cluster node that dies is restarted alone, on its own
    folder (its nodes.conf and append-only file), and rejoins the others."""
    if isinstance(embedded, EmbeddedRedis):
        return [redis_unit(embedded)]
    return [redis_unit(node, f"Redis Cluster node {node.port}") for node in embedded.nodes]


def start_redis(settings: Settings, env: dict[str, str]) -> EmbeddedRedis | EmbeddedCluster | None:
    """The Redis `make run` starts, if any, with its URL put in the children's env."""
    if "redis_url" in settings.model_fields_set:
        if settings.redis_cluster_size:
            logger.info("REDIS_URL is set: REDIS_CLUSTER_SIZE is ignored, no cluster is started")
        logger.info("using the Redis at REDIS_URL")
        return None
    embedded: EmbeddedRedis | EmbeddedCluster
    if settings.redis_cluster_size:
        embedded = start_embedded_cluster(settings)
        logger.info("the server and workers use the cluster at %s", _no_password(embedded.url))
    else:
        embedded = start_embedded_redis(settings)
    env["REDIS_URL"] = embedded.url
    return embedded


def _no_password(url: str) -> str:
    """The URL for the log, the password masked (it is in the data folder's redis.password)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://:***@{rest.split('@', 1)[1]}" if "@" in rest else url


def worker_env(env: dict[str, str], settings: Settings, index: int) -> dict[str, str]:
    """Worker `index` (from 0) gets WORKER_METRICS_PORT + index (one port each), and its share
    of the CPUs' threads when several run the local model (`local_thread_share`)."""
    child = {**env, **local_thread_share(settings)}
    if settings.worker_metrics_port:
        child["WORKER_METRICS_PORT"] = str(settings.worker_metrics_port + index)
    return child


def local_thread_share(settings: Settings, cpus: set[int] | None = None) -> dict[str, str]:
    """LOCAL_THREADS and LOCAL_BATCH_THREADS for each of RUN_WORKERS local-model workers: an
    equal share of the CPUs (and cores) this launcher may use, at least one thread. A setting
    given is kept. Each worker left to its default counts every CPU, and on 2 CPUs two
    workers then got 150 aggregate tokens/s for 8 sessions each and 48 for one each, against
    238 and 98 on one thread each (docs/benchmarks.md, "Issue 12, sixth pass")."""
    if settings.model_backend != "local" or settings.run_workers <= 1:
        return {}
    cpus = usable_cpus() if cpus is None else cpus
    share: dict[str, str] = {}
    if settings.local_threads is None:
        share["LOCAL_THREADS"] = str(max(1, physical_cores(cpus) // settings.run_workers))
    if settings.local_batch_threads is None:
        share["LOCAL_BATCH_THREADS"] = str(max(1, len(cpus) // settings.run_workers))
    return share


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

    env = dict(os.environ)
    if share := local_thread_share(settings):
        logger.info(
            "%d local-model workers share the CPUs: %s each",
            settings.run_workers,
            ", ".join(f"{name}={value}" for name, value in share.items()),
        )
    embedded = start_redis(settings, env)
    children = [Child("server", "server", env)]
    children += [
        Child(f"worker {n + 1}", "worker", worker_env(env, settings, n))
        for n in range(settings.run_workers)
    ]
    try:
        if embedded is not None:
            # Already started: registered so that its death is seen and healed.
            for unit in redis_units(embedded):
                unit.started_at = time.monotonic()
                supervisor.units.append(unit)
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
