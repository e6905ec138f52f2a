"""`python -m server`: run the API with uvicorn, as configured by the settings."""

from __future__ import annotations

import uvicorn

from core.config import get_settings
from core.heap import freeze_startup_heap
from core.logs import configure_logging

# Frames larger than this are refused by uvicorn with close code 1009 before we parse them;
# anything between the message limits (MAX_MESSAGE_CHARS, MAX_MESSAGE_BYTES) and this gets a
# `too_large` error event instead (server/frames.py).
WS_MAX_FRAME_BYTES = 1024 * 1024


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    import server.main  # noqa: F401  (the app's imports, before the heap is frozen)

    freeze_startup_heap()
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
