"""Logging setup, called once by each entry point (server app factory, worker, launcher)."""

from __future__ import annotations

import logging
import os
import re
import sys

_TOKEN_IN_TEXT = re.compile(r"(token=)([0-9a-fA-F]{8})[0-9a-fA-F-]{28}")


class RedactTokens(logging.Filter):
    """Session tokens are credentials: no log line carries one in full (uvicorn logs URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _TOKEN_IN_TEXT.sub(r"\1\2…", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr in one format. Safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_chat_handler", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(RedactTokens())
        handler._chat_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(os.environ.get("LOG_LEVEL", level).upper())
    # Per-request and per-frame noise stays out of INFO.
    for noisy in ("httpx", "httpcore", "httpx2", "openai", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
