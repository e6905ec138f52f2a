"""The React page in headless Chromium against the real stack.

Real processes only: the session's embedded Redis, `python -m server` serving the built page
(client/dist) and `python -m worker` with the local model. The browser side is
client/e2e/chat.e2e.mjs (playwright-core driving Debian's chromium), which also covers the
conversation sidebar (two chats, switching, renaming, deleting, reloading, the phone drawer).
It asks this harness, one line at a time, to kill the server, start it again on the same port,
expire the session, or store a chosen bot reply (the local model cannot be asked for an exact
text), and says `done` when every step has passed. The page is served with the server's
Content-Security-Policy; the script fails on any CSP violation.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.config import Settings
from core.keys import Keys
from core.models import Message, Source
from tests.conftest import make_settings
from tests.support.processes import ROOT, ServerChild, WorkerChild, settings_env

CLIENT = ROOT / "client"
DIST = CLIENT / "dist"
SCRIPT = CLIENT / "e2e" / "chat.e2e.mjs"
BASIC_SCRIPT = CLIENT / "e2e" / "basic.e2e.mjs"
# Where the page's screenshot goes; `E2E_SCREENSHOT=docs/chat-page.png make e2e` refreshes the
# one in the docs (by default it goes to the test's temporary directory).
SCREENSHOT_ENV = "E2E_SCREENSHOT"
# The conversation sidebar at desktop width, for the README:
# `E2E_SIDEBAR_SCREENSHOT=docs/sidebar.png make e2e`.
SIDEBAR_SCREENSHOT_ENV = "E2E_SIDEBAR_SCREENSHOT"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# The whole browser run; each wait inside it has its own limit (E2E_TIMEOUT_MS).
RUN_TIMEOUT = 420.0


def _missing_prerequisites() -> list[str]:
    missing = []
    if not (DIST / "index.html").is_file():
        missing.append("the built page (client/dist): run `make client-build`")
    if not (CLIENT / "node_modules" / "playwright-core").is_dir():
        missing.append("client/node_modules: run `make client-install`")
    if shutil.which("node") is None:
        missing.append("node")
    if not Path(CHROMIUM).is_file():
        missing.append(
            f"chromium at {CHROMIUM}: apt-get install -y --no-install-recommends chromium"
        )
    return missing


@pytest.fixture
def e2e_settings(redis_url: str) -> Settings:
    return make_settings(
        redis_url,
        model_backend="local",
        model_max_new_tokens=64,
        model_timeout_seconds=120.0,
        client_dir=DIST,
    )


class Harness:
    """The stack's processes, and what the browser script may ask of them."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.env = settings_env(settings)
        self.keys = Keys.from_settings(settings)
        self.worker = WorkerChild("worker", self.env, log_dir)
        self.server = ServerChild("server-1", self.env, log_dir)
        self.port = self.server.port
        self.restarts = 0

    def wait_ready(self) -> None:
        self.worker.wait_ready(timeout=120)
        self.server.wait_ready(timeout=60)

    def kill_server(self) -> None:
        self.server.kill()
        self.server.stop()

    def start_server(self) -> None:
        self.restarts += 1
        self.server = ServerChild(f"server-{self.restarts + 1}", self.env, self.log_dir, self.port)
        self.server.wait_ready(timeout=60)

    def expire_session(self, token: str) -> None:
        with redis.Redis.from_url(self.settings.redis_url) as client:
            assert client.delete(self.keys.session(token)) == 1

    def add_reply(self, token: str, question: str, reply: str) -> None:
        """Store a question and a chosen bot reply in the session, as a worker would have.
        Test-only: written straight into the document, so no worker sees the question."""
        human = Message(source=Source.HUMAN, msg=question)
        bot = Message(source=Source.BOT, msg=reply, reply_to=human.id)
        documents = [m.model_dump(mode="json", exclude_none=True) for m in (human, bot)]
        with redis.Redis.from_url(self.settings.redis_url) as client:
            key = self.keys.session(token)
            assert client.json().arrappend(key, "$.messages", *documents) != [None]

    def stop(self) -> None:
        self.server.stop()
        self.worker.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.log_dir.glob("*.log"))
        )


@pytest.fixture
def harness(e2e_settings: Settings, tmp_path: Path) -> Iterator[Harness]:
    missing = _missing_prerequisites()
    if missing:
        pytest.fail("the browser test needs: " + "; ".join(missing))
    stack = Harness(e2e_settings, tmp_path)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


def _read_line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the browser script took too long")
        ready, _, _ = select.select([process.stdout], [], [], min(remaining, 1.0))
        if ready:
            return process.stdout.readline()


@pytest.mark.timeout(600)
def test_chat_page_in_a_real_browser(harness: Harness, tmp_path: Path) -> None:
    stderr_path = tmp_path / "browser.log"
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "chat-page.png").resolve()
    sidebar_env = os.environ.get(SIDEBAR_SCREENSHOT_ENV)
    sidebar_shot = Path(sidebar_env or tmp_path / "sidebar.png").resolve()
    env = {
        **os.environ,
        "BASE_URL": harness.server.url,
        "CHROMIUM": CHROMIUM,
        "SCREENSHOT": str(screenshot),
        "SIDEBAR_SCREENSHOT": str(sidebar_shot),
    }
    done = False
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            ["node", str(SCRIPT)],
            cwd=CLIENT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert process.stdin is not None
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while (line := _read_line(process, deadline)) != "":
                if not line.startswith("E2E "):
                    continue
                request = json.loads(line[4:])
                if request.get("done"):
                    done = True
                    continue
                need = request["need"]
                if need == "kill-server":
                    harness.kill_server()
                elif need == "start-server":
                    harness.start_server()
                elif need == "expire-session":
                    harness.expire_session(request["token"])
                elif need == "add-reply":
                    harness.add_reply(request["token"], request["question"], request["reply"])
                else:
                    raise AssertionError(f"unknown request from the browser script: {need}")
                process.stdin.write("ok\n")
                process.stdin.flush()
            code = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()
    report = stderr_path.read_text(errors="replace")
    assert code == 0 and done, f"browser script failed ({code}):\n{report}\n{harness.logs()}"
    assert harness.restarts == 1
    assert screenshot.is_file()
    assert sidebar_shot.is_file()


@pytest.fixture
def basic_harness(redis_url: str, tmp_path: Path) -> Iterator[Harness]:
    """The same stack serving the dependency-free page, client/basic."""
    missing = [m for m in _missing_prerequisites() if "client/dist" not in m]
    if missing:
        pytest.fail("the browser test needs: " + "; ".join(missing))
    settings = make_settings(
        redis_url,
        model_backend="local",
        model_max_new_tokens=32,
        model_timeout_seconds=120.0,
        client_dir=CLIENT / "basic",
    )
    stack = Harness(settings, tmp_path)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@pytest.mark.timeout(300)
def test_basic_page_under_the_csp(basic_harness: Harness) -> None:
    """The basic page's script and styles are files: it works under script-src 'self'."""
    env = {**os.environ, "BASE_URL": basic_harness.server.url, "CHROMIUM": CHROMIUM}
    run = subprocess.run(
        ["node", str(BASIC_SCRIPT)],
        cwd=CLIENT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"basic page failed:\n{run.stderr}\n{basic_harness.logs()}"
