"""Security properties of the running service: no token in the logs (however the server is
started), the security headers on every answer, a page that runs under its CSP."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from core.config import Settings
from core.logs import FORMAT, RedactTokens
from launcher.redis_server import free_port
from tests.support.processes import ROOT, settings_env
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


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _start_uvicorn(settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    """uvicorn's own command line, exactly as a user would type it (its default logging)."""
    uvicorn_cli = Path(sys.executable).with_name("uvicorn")
    command = [str(uvicorn_cli), "server.main:create_app", "--factory", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT
        )


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"uvicorn exited:\n{log.read_text(errors='replace')}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"uvicorn not ready:\n{log.read_text(errors='replace')}")


async def test_uvicorns_own_command_line_logs_no_full_token(
    settings: Settings, tmp_path: Path
) -> None:
    """`uvicorn server.main:create_app --factory`: uvicorn's own logging config and access log,
    not `python -m server`'s; the app still cuts every token short."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "uvicorn.log"
    process = _start_uvicorn(settings, port, log)
    try:
        _wait_ready(url, process, log)
        async with httpx.AsyncClient(base_url=url) as http:
            token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
            async with websockets.connect(f"ws://127.0.0.1:{port}/chat?token={token}") as ws:
                await ws.send("hello")
                assert '"ack"' in str(await ws.recv())
            assert (await http.get("/refresh_token", params={"token": token})).status_code == 200
            await http.get("/refresh_token", params={"token": token[:-1] + "0"})
    finally:
        _stop(process)
    logged = log.read_text(errors="replace")
    assert "GET /refresh_token?token=" in logged, "uvicorn's access log is on"
    assert "Logging error" not in logged, "uvicorn's formatters still get their arguments"
    assert "WebSocket /chat?token=" in logged, "uvicorn logs the socket's URL"
    assert token[:8] in logged
    assert token not in logged, logged
    assert token[8:] not in logged
    assert token.replace("-", "") not in logged


PAGE_CSP = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data:",
    "connect-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'none'",
    "frame-ancestors": "'none'",
    "form-action": "'self'",
}


def _policy(header: str) -> dict[str, str]:
    directives = (part.strip().split(None, 1) for part in header.split(";") if part.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


async def test_every_answer_carries_the_security_headers(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        token = await stack.new_session()
        answers = {
            "/": await http.get("/"),
            "/app.js": await http.get("/app.js"),
            "/test": await http.get("/test"),
            "/token": await http.post("/token", params={"name": "Ann"}),
            "/token (400)": await http.post("/token", params={"name": "  "}),
            "/refresh_token": await http.get("/refresh_token", params={"token": token}),
            "/refresh_token (422)": await http.get("/refresh_token"),
            "/missing (404)": await http.get("/no/such/file.png"),
            "/readyz": await http.get("/readyz"),
        }
    assert answers["/"].headers["content-type"].startswith("text/html")
    for what, answer in answers.items():
        csp = answer.headers.get("content-security-policy")
        assert csp is not None, f"{what} ({answer.status_code}) has no CSP"
        policy = _policy(csp)
        for directive, value in PAGE_CSP.items():
            assert policy.get(directive) == value, (what, directive, csp)
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, csp
        assert answer.headers.get("x-content-type-options") == "nosniff", what
        assert answer.headers.get("referrer-policy") == "no-referrer", what


async def test_the_api_docs_work_under_their_own_policy(stack: Stack) -> None:
    """Swagger UI comes from a CDN with an inline starter script: only /docs allows that."""
    async with httpx.AsyncClient(base_url=stack.url) as http:
        docs = await http.get("/docs")
    assert docs.status_code == 200
    policy = _policy(docs.headers["content-security-policy"])
    assert "https://cdn.jsdelivr.net" in policy["script-src"]
    assert policy["frame-ancestors"] == "'none'"
    assert docs.headers["referrer-policy"] == "no-referrer"


INLINE_CODE = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|<style\b|\sstyle=|\son[a-z]+=", re.I)


@pytest.mark.parametrize("page", ["client/basic/index.html", "client/dist/index.html"])
def test_the_pages_have_no_inline_code(page: str) -> None:
    """script-src/style-src 'self' refuse inline scripts, <style> and style="" attributes."""
    path = ROOT / page
    if not path.is_file():
        pytest.skip(f"{page} is not built (make client-build)")
    html = path.read_text()
    assert INLINE_CODE.search(html) is None, INLINE_CODE.search(html)
