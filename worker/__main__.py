"""`python -m worker`: run one worker until SIGTERM or Ctrl+C. Run as many as you like."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from core.config import Settings, get_settings
from core.heap import freeze_startup_heap
from core.logs import configure_logging
from core.metrics import serve_http, serving_registry
from worker.backends import create_backend
from worker.worker import Worker, WorkerFailed

logger = logging.getLogger("worker")


async def serve(settings: Settings) -> None:
    worker = Worker(settings, create_backend(settings))  # the backend's imports happen here
    freeze_startup_heap()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.request_shutdown)
    metrics = serve_metrics(settings)
    try:
        await worker.run()
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()


def serve_metrics(settings: Settings) -> Any:
    """This process's metrics on WORKER_METRICS_PORT (0 = off), or None. A port already in use
    costs the metrics, not the worker: exiting would only have the launcher restart it into
    the same clash, again and again, while messages wait."""
    if not settings.worker_metrics_port:
        return None
    try:
        # This process's metrics only; the queue's length comes from the server's /metrics.
        return serve_http(
            settings.worker_metrics_port, settings.metrics_host, serving_registry(None)
        )
    except OSError as exc:
        logger.error(
            "worker metrics not served: cannot listen on %s:%d (%s); set WORKER_METRICS_PORT "
            "to a free port, or 0 for none",
            settings.metrics_host,
            settings.worker_metrics_port,
            exc,
        )
        return None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (it comes with uvicorn[standard], as the server uses it): the
    worker's loop spends most of its time in socket reads and writes, where uvloop is faster."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve(settings))
    except WorkerFailed:
        logging.getLogger("worker").critical("worker stopped on a failure")
        sys.exit(1)


if __name__ == "__main__":
    main()
