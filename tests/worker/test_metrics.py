"""Worker metrics: reclaims counted, and `python -m worker` / `python -m server` serving their
metrics on their own ports (the server in prometheus-client's multi-process mode)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from core.config import Settings
from core.metrics import serve_http, serving_registry
from core.store import SessionStore
from launcher.__main__ import metrics_lines, worker_env
from launcher.redis_server import free_port
from tests.conftest import make_settings
from tests.support import sessions
from tests.support.metrics import scrape, until, value
from tests.support.model_servers import ModelServer
from tests.support.processes import ServerChild, WorkerChild, settings_env
from tests.worker.test_worker import strand_with_dead_worker
from worker.__main__ import serve_metrics
from worker.worker import Worker


@pytest.fixture
def worker_settings(redis_url: str, model_server: ModelServer) -> Settings:
    return make_settings(redis_url, openai_base_url=model_server.openai_base_url)


@pytest.fixture
def worker_store(redis: Redis, worker_settings: Settings) -> SessionStore:
    return SessionStore(redis, worker_settings)


@pytest.fixture
def metrics_url() -> Iterator[str]:
    """This process's metrics on a port of their own, as `python -m worker` serves them."""
    server = serve_http(free_port(), "127.0.0.1", serving_registry(None))
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


async def test_a_reclaimed_entry_is_counted(
    redis: Redis, worker_store: SessionStore, worker_settings: Settings, metrics_url: str
) -> None:
    before = value(await scrape(metrics_url), "chat_worker_reclaims_total")
    session = await worker_store.create("Ann")
    await sessions.add_human_message(worker_store, session.token, "lost in a crash?")
    lease_ms = int(worker_settings.worker_lease_seconds * 1000)
    await strand_with_dead_worker(redis, worker_store, session.token, lease_ms)
    worker = Worker(worker_settings)
    task = asyncio.create_task(worker.run())
    try:
        after = await until(
            metrics_url, lambda s: value(s, "chat_worker_reclaims_total") > before, timeout=30
        )
    finally:
        worker.request_shutdown()
        await task
    assert value(after, "chat_worker_reclaims_total") == before + 1


@pytest.mark.slow
async def test_worker_and_multiprocess_server_serve_their_own_metrics_ports(
    worker_settings: Settings, tmp_path: Path
) -> None:
    env = settings_env(worker_settings)
    worker_port, server_port = free_port(), free_port()
    worker = WorkerChild("worker", {**env, "WORKER_METRICS_PORT": str(worker_port)}, tmp_path)
    server = ServerChild(
        "server",
        {**env, "SERVER_WORKERS": "2", "SERVER_METRICS_PORT": str(server_port)},
        tmp_path,
    )
    try:
        # In threads: the test model server runs on this event loop.
        await asyncio.to_thread(worker.wait_ready)
        await asyncio.to_thread(server.wait_ready)
        await _one_message(server.url, server.ws_url)
        server_metrics = await until(
            f"http://127.0.0.1:{server_port}/metrics",
            lambda s: value(s, "chat_messages_received_total") >= 1,
        )
        worker_metrics = await until(
            f"http://127.0.0.1:{worker_port}/metrics",
            lambda s: value(s, "chat_replies_total", outcome="answered") >= 1,
        )
        async with httpx.AsyncClient() as client:
            public = await client.get(f"{server.url}/metrics")
    finally:
        server.stop()
        worker.stop()
    assert value(server_metrics, "chat_messages_received_total") == 1
    assert value(worker_metrics, "chat_replies_total", outcome="answered") == 1
    assert value(worker_metrics, "chat_first_token_seconds_count") == 1
    assert public.status_code == 404


async def _one_message(url: str, ws_url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        token = (await client.post("/token", params={"name": "Ann"})).json()["token"]
    async with websockets.connect(f"{ws_url}/chat?token={token}") as ws:
        await ws.send("count me")
        while '"type":"message"' not in (frame := str(await ws.recv())).replace(" ", ""):
            assert '"error"' not in frame, frame


def test_make_run_gives_each_worker_its_own_port_and_says_where(redis_url: str) -> None:
    settings = make_settings(redis_url, run_workers=2, worker_metrics_port=9101)
    ports = [worker_env({}, settings, n)["WORKER_METRICS_PORT"] for n in range(2)]
    lines = metrics_lines(settings)
    off = metrics_lines(make_settings(redis_url, metrics_enabled=False))
    assert ports == ["9101", "9102"]
    assert lines == [
        f"server metrics: http://localhost:{settings.server_port}/metrics",
        "worker 1 metrics: http://127.0.0.1:9101/metrics",
        "worker 2 metrics: http://127.0.0.1:9102/metrics",
    ]
    assert off[0].endswith("off (METRICS_ENABLED=false)") and "WORKER_METRICS_PORT" in off[1]


def test_a_taken_metrics_port_costs_the_metrics_not_the_worker(
    worker_settings: Settings, metrics_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Exiting on a port clash would have the launcher restart the worker into the same clash
    forever while messages wait; the worker serves without metrics and says why."""
    taken = int(metrics_url.rsplit(":", 1)[1].split("/")[0])
    settings = worker_settings.model_copy(update={"worker_metrics_port": taken})
    assert serve_metrics(settings) is None
    assert any(
        r.levelname == "ERROR" and "WORKER_METRICS_PORT" in r.getMessage() for r in caplog.records
    )
