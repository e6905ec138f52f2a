"""`python -m launcher` (what `make run` runs): the whole service in the foreground.

Starts the embedded Redis (unless REDIS_URL names an external server), the server and
RUN_WORKERS workers, each a child process with its own logs on this terminal. Ctrl+C (or
SIGTERM) stops them in order: server and workers first, Redis last. If a child dies, the rest
are stopped too and the exit status says so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from core.config import Settings, get_settings
from core.logs import configure_logging
from launcher.redis_server import EmbeddedRedis

logger = logging.getLogger("launcher")

STOP_TIMEOUT = 20.0


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False

    def spawn(self, name: str, module: str, env: dict[str, str]) -> None:
        # Its own process group: a Ctrl+C reaches only the launcher, which stops the children
        # in order (Redis last) instead of all of them at once.
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.children.append((name, process))
        logger.info("started %s (pid %d)", name, process.pid)

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        logger.info("got %s; stopping", signal.Signals(signum).name)
        self.stopping = True

    def watch(self) -> int:
        """Wait until asked to stop or until a child exits; returns the exit status."""
        while not self.stopping:
            for name, process in self.children:
                if process.poll() is not None:
                    logger.error(
                        "%s exited with status %s; stopping the rest", name, process.returncode
                    )
                    return 1
            time.sleep(0.2)
        return 0

    def stop_children(self) -> None:
        for _, process in self.children:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, process in self.children:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                process.kill()
                process.wait()


def main() -> int:
    settings = get_settings()
    configure_logging(settings.log_level)
    supervisor = Supervisor(settings)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)

    embedded: EmbeddedRedis | None = None
    env = dict(os.environ)
    if "redis_url" in settings.model_fields_set:
        logger.info("using the Redis at REDIS_URL")
    else:
        embedded = EmbeddedRedis(
            settings.embedded_redis_port,
            settings.redis_data_dir,
            server_bin=settings.redis_server_bin,
            module=settings.redisjson_module,
        )
        embedded.start()
        env["REDIS_URL"] = embedded.url
    status = 0
    try:
        supervisor.spawn("server", "server", env)
        for number in range(settings.run_workers):
            supervisor.spawn(f"worker {number + 1}", "worker", env)
        logger.info(
            "chat service starting: open http://%s:%d/ (Ctrl+C stops everything)",
            "localhost"
            if settings.server_host in ("127.0.0.1", "0.0.0.0")
            else settings.server_host,
            settings.server_port,
        )
        status = supervisor.watch()
    finally:
        supervisor.stop_children()
        if embedded is not None:
            embedded.stop()
        logger.info("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
