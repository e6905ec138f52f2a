"""schemathesis's own CLI, every check, against the live service: `st run .../openapi.json
--checks all` with the server and a worker as real processes and a model server answering.

Rate limits are off so the fuzzer reaches the handlers (they are tested in test_limits.py);
examples are bounded so the run takes about a minute. Any failure schemathesis reports fails
the test, with its report in the message.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Settings
from tests.conftest import make_settings
from tests.support.model_servers import ModelServer
from tests.support.processes import ROOT, ServerChild, WorkerChild, settings_env

ST = Path(sys.executable).with_name("st")
MAX_EXAMPLES = 15
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


@pytest.mark.timeout(300)
async def test_schemathesis_finds_no_failure(live_server: ServerChild, tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        str(ST),
        "--no-color",
        "--config-file",
        str(ROOT / "schemathesis.toml"),
        "run",
        f"{live_server.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",
        "--workers",
        "2",
        "--request-timeout",
        "20",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-12000:]
