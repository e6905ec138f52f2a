"""Logging setup, called once by each entry point (server app factory, worker, launcher)."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

_TOKEN_IN_TEXT = re.compile(r"(token=)([0-9a-fA-F]{8})[0-9a-fA-F-]{28}")


def redact(text: str) -> str:
    """`token=<uuid>` cut to its first 8 characters."""
    return _TOKEN_IN_TEXT.sub(r"\1\2…", text)


def _redact_arg(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactTokens(logging.Filter):
    """Session tokens are credentials: no log line carries one in full (uvicorn logs URLs).

    The arguments are redacted one by one first, so formatters that read `record.args`
    themselves (uvicorn's access log formatter unpacks them) keep working; a token that only
    shows once the message is formatted (split over arguments, inside a non-string object)
    collapses the record to its redacted text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(arg) for arg in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {key: _redact_arg(arg) for key, arg in record.args.items()}
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_every_handler() -> None:
    """Put `RedactTokens` on every handler that exists now, whoever configured it.

    `uvicorn server.main:create_app --factory` configures uvicorn's own loggers (their
    handlers do not propagate to ours, and the access log prints `?token=` URLs) before it
    calls the factory; the factory calls this, so those handlers redact too. Safe to call
    more than once.
    """
    loggers = [logging.getLogger()]
    loggers += [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactTokens) for f in handler.filters):
                handler.addFilter(RedactTokens())


FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr in one format, and redact tokens in every handler
    already installed by anyone else. Safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_chat_handler", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(RedactTokens())
        handler._chat_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(os.environ.get("LOG_LEVEL", level).upper())
    redact_every_handler()
    # Per-request and per-frame noise stays out of INFO.
    for noisy in ("aiohttp", "httpx", "httpcore", "httpx2", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
