"""Security properties of the running service: no token in the logs, production settings."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from core.logs import FORMAT, RedactTokens
from tests.support.stack import Stack

NOISY = ("httpx", "httpcore", "websockets", "uvicorn", "uvicorn.error", "redis", "asyncio")


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """Every record at DEBUG, from every logger, formatted by the service's own handler setup."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(name) for name in NOISY)]
    levels = [logger.level for logger in loggers]
    root.addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        yield text
    finally:
        root.removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def test_a_whole_session_logs_no_full_token(stack: Stack, debug_log: io.StringIO) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
        async with stack.socket(token) as chat:
            await chat.send("hello")
            await chat.until("message")
            await chat.send('{"type": "stop"}')
            await chat.send("")  # a bad frame: error path
        assert (await http.get("/refresh_token", params={"token": token})).status_code == 200
        # Refusals log too: a socket from a foreign page, a refresh of an unknown session.
        with pytest.raises(InvalidStatus):
            async with websockets.connect(
                f"{stack.server.ws_url}/chat?token={token}",
                additional_headers={"Origin": "https://evil.example"},
            ):
                pass
        await http.get("/refresh_token", params={"token": token[:-1] + "0"})
    await stack.stop_workers()
    logged = debug_log.getvalue()
    assert "DEBUG" in logged, "the capture saw DEBUG records"
    assert token[:8] in logged, "the session shows up in the log, shortened"
    assert token not in logged
    assert token.replace("-", "") not in logged
    assert token[8:] not in logged
