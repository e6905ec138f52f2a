"""schemathesis's own CLI, every check, against the live service: `st run .../openapi.json
--checks all` with the server and a worker as real processes and a model server answering.

Every operation of the schema gets inputs that fit it and inputs that do not: none may get a
500, an answer the schema does not describe, a refusal of valid input or an acceptance of
invalid input, and a method a path does not have gets 405 with the path's `Allow`. Rate
limits are off so the fuzzer reaches the handlers (they are tested in test_limits.py);
examples are bounded so the run takes well under a minute. Any failure schemathesis reports
fails the test, with its report in the message. (This replaces the in-process fuzzing of
test_openapi_fuzz.py, whose one check, no 500, is one of these.)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from core.accounts import AccountStore
from core.config import Settings
from core.keys import Keys
from core.redis import create_redis
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer
from tests.support.model_servers import ModelServer
from tests.support.processes import ROOT, ServerChild, WorkerChild, settings_env

ST = Path(sys.executable).with_name("st")
MAX_EXAMPLES = 60
NO_LIMITS = {
    "RATE_LIMIT_TOKEN_REQUESTS": "0",
    "RATE_LIMIT_REFRESH_REQUESTS": "0",
    "RATE_LIMIT_REGISTER_REQUESTS": "0",
    "RATE_LIMIT_SESSION_MESSAGES": "0",
    "RATE_LIMIT_ADDRESS_MESSAGES": "0",
    "MAX_UNANSWERED_MESSAGES": "0",
    "HTTP_REPLY_TIMEOUT_SECONDS": "10",
}


@pytest.fixture
def live_settings(redis_url: str, model_server: ModelServer) -> Settings:
    return make_settings(redis_url, openai_base_url=model_server.openai_base_url)


@pytest.fixture
async def api_key(live_settings: Settings) -> str:
    """A user's key, sent with every request, so the routes that need one are reached."""
    redis = create_redis(live_settings)
    try:
        _, key = await AccountStore(redis, Keys.from_settings(live_settings)).register("Fuzz")
    finally:
        await redis.aclose()
    return key


@pytest.fixture
def live_server(live_settings: Settings, tmp_path: Path) -> Iterator[ServerChild]:
    env = settings_env(live_settings, **NO_LIMITS)
    worker = WorkerChild("worker", env, tmp_path)
    server = ServerChild("server", env, tmp_path)
    try:
        server.wait_ready()
        worker.wait_ready()
        yield server
    finally:
        server.stop()
        worker.stop()


#: A SystemError from CPython 3.11.7's `ast.parse`, seen once in a fresh-clone CI run: it came
#: while hypothesis parsed a source file to describe a filter's lambda, with schemathesis's two
#: worker threads running. Its check of the parser's recursion depth is not safe across threads.
AST_RACE = "AST constructor recursion depth mismatch"


async def run_st(url: str, cwd: Path, *options: str) -> tuple[int | None, str]:
    """`st run` with every check; its exit status and its report. A run that hit CPython's
    AST race (`AST_RACE`) is run again once on one worker thread, where it cannot happen."""
    status, report = await _st(url, cwd, "2", *options)
    if status != 0 and AST_RACE in report:
        status, report = await _st(url, cwd, "1", *options)
    return status, report


async def _st(url: str, cwd: Path, workers: str, *options: str) -> tuple[int | None, str]:
    process = await asyncio.create_subprocess_exec(
        str(ST),
        "--no-color",
        "--config-file",
        str(ROOT / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",
        "--workers",
        workers,
        "--request-timeout",
        "20",
        *options,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode, output.decode(errors="replace")


@pytest.mark.timeout(300)
async def test_schemathesis_finds_no_failure(
    live_server: ServerChild, api_key: str, tmp_path: Path
) -> None:
    status, report = await run_st(
        live_server.url, tmp_path, "--header", f"Authorization: Bearer {api_key}"
    )
    assert status == 0, report[-12000:]


async def test_the_run_does_fail_on_a_server_error(tmp_path: Path) -> None:
    app = FastAPI()

    @app.get("/broken")
    async def broken(n: int) -> JSONResponse:
        return JSONResponse({"n": n}, status_code=500 if n > 3 else 200)

    async with InProcessServer(app) as served:
        status, report = await run_st(served.url, tmp_path)
    assert status == 1, report[-4000:]
    assert "Server error" in report
