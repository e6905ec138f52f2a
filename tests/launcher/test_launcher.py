"""`python -m launcher` (what `make run` runs): the whole service from one command, as a
tutorial reader would use it from Postman, with the default offline model."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import websockets

from bench.support import Child
from launcher.__main__ import local_thread_share, worker_env
from launcher.redis_server import free_port, port_in_use
from tests.conftest import make_settings

pytestmark = pytest.mark.slow


async def test_run_brings_up_everything_and_stops_cleanly(tmp_path: Path) -> None:
    redis_port, server_port = free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REDIS_URL", "MODEL_BACKEND", "KEY_PREFIX")
    }
    env |= {
        "EMBEDDED_REDIS_PORT": str(redis_port),
        "SERVER_PORT": str(server_port),
        "REDIS_DATA_DIR": str(tmp_path / "redis"),
        "MODEL_MAX_NEW_TOKENS": "24",
    }
    run = Child("run", ["launcher"], env, tmp_path)
    process = run.process
    base = f"http://127.0.0.1:{server_port}"
    try:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=base) as http:
            while True:
                assert process.poll() is None, run.log()
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the service did not come up"
                await asyncio.sleep(0.2)
            assert (await http.get("/test")).json() == {"msg": "API is Online"}
            token = (await http.post("/token", params={"name": "Postman"})).json()["token"]
            async with websockets.connect(f"ws://127.0.0.1:{server_port}/chat?token={token}") as ws:
                await ws.send("Hi! Can you tell me a fun fact?")
                events: list[dict[str, str]] = []
                while not events or events[-1]["type"] not in ("message", "error"):
                    events.append(json.loads(await ws.recv()))
            history = (await http.get("/refresh_token", params={"token": token})).json()
        assert events[0]["type"] == "ack"
        assert events[-1]["type"] == "message" and events[-1]["msg"]
        assert [m["source"] for m in history["messages"]] == ["human", "bot"]
    finally:
        status = await asyncio.to_thread(run.interrupt)
    output = run.log()
    assert status == 0, output
    assert "stopped" in output
    assert not port_in_use(redis_port) and not port_in_use(server_port)
    assert (tmp_path / "redis" / "appendonlydir").is_dir()


def test_several_local_workers_share_the_cpus_threads() -> None:
    """Each of two local-model workers left to its default counted every CPU: on 2 CPUs the
    two got 150 aggregate tokens/s for 8 sessions each, against 238 on one thread each
    (docs/benchmarks.md, "Issue 12, sixth pass")."""
    local = make_settings("redis://127.0.0.1:1", model_backend="local", run_workers=2)
    assert local_thread_share(local, {0, 1}) == {"LOCAL_THREADS": "1", "LOCAL_BATCH_THREADS": "1"}
    assert local_thread_share(local.model_copy(update={"run_workers": 4}), {0, 1}) == {
        "LOCAL_THREADS": "1",
        "LOCAL_BATCH_THREADS": "1",
    }
    told = local.model_copy(update={"local_threads": 2})
    assert local_thread_share(told, {0, 1, 2, 3}) == {"LOCAL_BATCH_THREADS": "2"}
    assert local_thread_share(local.model_copy(update={"run_workers": 1}), {0, 1}) == {}
    remote = local.model_copy(update={"model_backend": "openai"})
    assert local_thread_share(remote, {0, 1}) == {}
    child = worker_env({"PATH": "/bin"}, local, 1)
    assert child["PATH"] == "/bin" and "LOCAL_BATCH_THREADS" in child
