"""`python -m server`: run the API with uvicorn, as configured by the settings."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from core.config import Settings, get_settings
from core.heap import freeze_startup_heap
from core.logs import configure_logging

# Frames larger than this are refused by uvicorn with close code 1009 before we parse them;
# anything between the message limits (MAX_MESSAGE_CHARS, MAX_MESSAGE_BYTES) and this gets a
# `too_large` error event instead (server/frames.py).
WS_MAX_FRAME_BYTES = 1024 * 1024


def prepare_metrics_dir(workers: int) -> Path | None:
    """For SERVER_WORKERS > 1, prometheus-client's multi-process mode: a directory for the
    processes' metric files, named in the environment before prometheus-client is imported
    (here, and in the worker processes uvicorn spawns). One left by an earlier run is
    emptied, or a dead run's counts would be added in. Returns the directory this made (and
    `main` removes at the end), None for one given in PROMETHEUS_MULTIPROC_DIR."""
    if workers <= 1:
        return None
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        shutil.rmtree(given, ignore_errors=True)
        Path(given).mkdir(parents=True, mode=0o700)
        return None
    made = Path(tempfile.mkdtemp(prefix="chat-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(made)
    return made


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    metrics_dir = None
    if settings.metrics_enabled:
        metrics_dir = prepare_metrics_dir(settings.server_workers)
    import server.main  # noqa: F401  (the app's imports, before the heap is frozen)

    if settings.metrics_enabled and settings.server_metrics_port:
        # One port for all the server's processes: this one serves their summed files.
        from core.metrics import QueueCollector, serve_http, serving_registry

        registry = serving_registry(QueueCollector(settings))
        serve_http(settings.server_metrics_port, settings.metrics_host, registry)

    freeze_startup_heap()
    try:
        _run_uvicorn(settings)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_uvicorn(settings: Settings) -> None:
    uvicorn.run(
        "server.main:create_app",
        factory=True,
        host=settings.server_host,
        port=settings.server_port,
        workers=settings.server_workers,
        ws_max_size=WS_MAX_FRAME_BYTES,
        # Browsers offer permessage-deflate; accepting it costs a zlib context per socket
        # (about 34 KiB, docs/benchmarks.md) for frames that are a few hundred bytes of JSON.
        ws_per_message_deflate=False,
        log_config=None,
        access_log=False,
        # X-Forwarded-For is honoured by the app itself, from FORWARDED_ALLOW_IPS only.
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
