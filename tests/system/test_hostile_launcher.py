"""The launcher (`python -m launcher`, what `make run` runs) heals its children.

The issue: a worker died with SIGILL on the first message and the launcher stopped the server
and Redis too. Here real processes die under a real launcher: a worker killed with SIGSEGV is
restarted and the next message is answered end to end; a worker that cannot start is a crash
loop logged once while the server keeps answering /readyz; the embedded Redis killed with
SIGKILL comes back on the same port with its data; Ctrl+C still stops everything, Redis last.
The model is the OpenAI-compatible test server, so no local model is loaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import websockets

from bench.support import Child
from launcher.redis_server import free_port, port_in_use
from tests.support.hostile import HostileRun, record
from tests.support.model_servers import ModelServer

pytestmark = pytest.mark.slow


@dataclass
class Launched:
    child: Child
    server_port: int
    redis_port: int
    data_dir: Path
    last_token: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def pids(self, name: str) -> list[int]:
        """Every pid the launcher logged for this child, in order of starting."""
        pattern = rf"started {re.escape(name)} \(pid (\d+)\)"
        return [int(pid) for pid in re.findall(pattern, self.child.log())]

    async def until_log(self, pattern: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.child.log())) < count:
            assert self.child.process.poll() is None, self.child.log()[-4000:]
            assert time.monotonic() < deadline, f"no {pattern!r}:\n{self.child.log()[-4000:]}"
            await asyncio.sleep(0.1)

    async def until_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.base) as http:
            while True:
                assert self.child.process.poll() is None, self.child.log()[-4000:]
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"not ready:\n{self.child.log()[-4000:]}"
                await asyncio.sleep(0.2)

    async def chat(self, text: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """A new session sends one message; every event up to its reply (or error)."""
        async with httpx.AsyncClient(base_url=self.base) as http:
            token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
        self.last_token = token
        events: list[dict[str, Any]] = []
        url = f"ws://127.0.0.1:{self.server_port}/chat?token={token}"
        async with websockets.connect(url) as ws:
            await ws.send(text)
            async with asyncio.timeout(timeout):
                while not events or events[-1]["type"] not in ("message", "error"):
                    events.append(json.loads(await ws.recv()))
        return events


@asynccontextmanager
async def launched(tmp_path: Path, **extra: str) -> AsyncIterator[Launched]:
    async with ModelServer() as model:
        redis_port, server_port = free_port(), free_port()
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("REDIS_URL", "KEY_PREFIX", "LOCAL_MODEL_PATH")
        }
        env |= {
            "EMBEDDED_REDIS_PORT": str(redis_port),
            "SERVER_PORT": str(server_port),
            "REDIS_DATA_DIR": str(tmp_path / "redis"),
            "MODEL_BACKEND": "openai",
            "OPENAI_BASE_URL": model.openai_base_url,
            "RUN_WORKERS": "1",
            "WORKER_LEASE_SECONDS": "3",
            "LOG_LEVEL": "INFO",
        } | extra
        child = Child("launcher", ["launcher"], env, tmp_path)
        run = Launched(child, server_port, redis_port, tmp_path / "redis")
        try:
            await run.until_ready()
            yield run
        finally:
            if child.process.poll() is None:
                await asyncio.to_thread(child.interrupt)


def reply_of(events: list[dict[str, Any]]) -> str:
    assert events[0]["type"] == "ack", events
    assert events[-1]["type"] == "message", events
    return str(events[-1]["msg"])


async def test_a_worker_killed_with_sigsegv_is_restarted_and_the_service_answers(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    async with launched(tmp_path) as run:
        await run.until_log(r"ready:", timeout=60)
        assert reply_of(await run.chat("before the crash")) == "echo: before the crash"
        first = run.pids("worker 1")[-1]
        servers_before = run.pids("server")
        os.kill(first, signal.SIGSEGV)
        await run.until_log(r"worker 1 exited with signal SIGSEGV", timeout=30)
        await run.until_log(r"started worker 1 \(pid \d+\)", timeout=30, count=2)
        second = run.pids("worker 1")[-1]
        # Sent right away: it waits in the stream until the new worker takes it.
        events = await run.chat("after the crash", timeout=90)
        assert reply_of(events) == "echo: after the crash"
        assert run.pids("server") == servers_before  # nothing else was restarted
        assert run.child.process.poll() is None
        log = run.child.log()
    assert second != first
    assert "stopping the rest" not in log
    record(
        HostileRun(
            case="worker SIGSEGV under the launcher",
            load="1 worker killed with SIGSEGV, then 1 message",
            lost=0,
            client_saw=" ".join(dict.fromkeys(e["type"] for e in events)),
            figures={"worker restarts": "1", "server restarts": "0"},
            seconds=time.monotonic() - started,
        )
    )


async def test_a_crash_loop_is_logged_once_and_the_server_stays_ready(tmp_path: Path) -> None:
    # A local model file that does not exist: the worker dies at once, every time.
    broken = {"MODEL_BACKEND": "local", "LOCAL_MODEL_PATH": str(tmp_path / "missing.gguf")}
    async with launched(tmp_path, **broken) as run:
        await run.until_log(r"worker 1 is crash-looping", timeout=90)
        deaths_at_report = len(run.pids("worker 1"))
        await run.until_log(r"started worker 1 \(pid", timeout=90, count=deaths_at_report + 1)
        async with httpx.AsyncClient(base_url=run.base) as http:
            assert (await http.get("/readyz")).status_code == 200
        log = run.child.log()
    assert log.count("is crash-looping") == 1
    banner = next(line for line in log.splitlines() if "is crash-looping" in line)
    assert "status 1" in banner and "see its log above" in banner
    assert deaths_at_report >= 5
    assert "Local model file not found" in log


async def test_the_embedded_redis_is_restarted_with_its_data(tmp_path: Path) -> None:
    async with launched(tmp_path) as run:
        await run.until_log(r"ready:", timeout=60)
        assert reply_of(await run.chat("kept across a Redis crash")) == (
            "echo: kept across a Redis crash"
        )
        kept = run.last_token
        await asyncio.sleep(1.5)  # appendfsync everysec: the reply is on disk
        await asyncio.to_thread(kill_redis, run)
        await run.until_log(r"restarting the embedded Redis", timeout=30)
        await run.until_ready(timeout=60)
        # The server's event fan-out closes the sockets open across the outage with 1012
        # ("reconnect"); a client reconnects, as this one does.
        events = await chat_reconnecting(run, "after Redis came back")
        assert reply_of(events) == "echo: after Redis came back"
        assert "restarted embedded Redis" in run.child.log()
        assert len(run.pids("server")) == 1  # the server was not restarted
        async with httpx.AsyncClient(base_url=run.base) as http:
            history = (await http.get("/refresh_token", params={"token": kept})).json()
    assert [m["msg"] for m in history["messages"]] == [
        "kept across a Redis crash",
        "echo: kept across a Redis crash",
    ]


async def chat_reconnecting(run: Launched, text: str, timeout: float = 90.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await run.chat(text, timeout=max(1.0, deadline - time.monotonic()))
        except websockets.ConnectionClosedError as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1012, exc
            assert time.monotonic() < deadline, "never answered after Redis came back"
            await asyncio.sleep(0.5)


def kill_redis(run: Launched) -> None:
    """SIGKILL the embedded redis-server (its pid from INFO, with the launcher's password)."""
    password = (run.data_dir / "redis.password").read_text().strip()
    client = redis.Redis(port=run.redis_port, password=password)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    os.kill(pid, signal.SIGKILL)


async def test_ctrl_c_stops_everything_redis_last(tmp_path: Path) -> None:
    async with launched(tmp_path) as run:
        await run.until_log(r"ready:", timeout=60)
        status = await asyncio.to_thread(run.child.interrupt)
        log = run.child.log()
    assert status == 0, log
    assert log.index("stopped the server and workers") < log.index("stopping the embedded Redis")
    assert not port_in_use(run.server_port) and not port_in_use(run.redis_port)
