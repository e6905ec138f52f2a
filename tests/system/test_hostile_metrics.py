"""Hostile clients against the metrics: sockets that vanish mid-message and a scraper that
hammers /metrics, against a real server process, a real worker and a real Redis. The numbers
must still add up afterwards (no drifting gauge, every message counted once) and the
well-behaved user must lose nothing."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import websockets

from launcher.redis_server import free_port
from tests.conftest import make_settings
from tests.support.hostile import HostileRun, record
from tests.support.metrics import Samples, scrape, until, value
from tests.support.model_servers import ModelServer, ModelServerBehaviour
from tests.support.processes import ServerChild, WorkerChild, settings_env
from tests.support.raw_ws import RawSocket

pytestmark = pytest.mark.slow

VANISHING = 40
USER_MESSAGES = 10
SCRAPES = 200


@pytest.fixture
async def model() -> AsyncIterator[ModelServer]:
    async with ModelServer(ModelServerBehaviour(token_delay=0.002)) as server:
        yield server


async def _token(http: httpx.AsyncClient) -> str:
    response = await http.post("/token", params={"name": "Ann"})
    response.raise_for_status()
    token: str = response.json()["token"]
    return token


async def _vanish(server: ServerChild, token: str, reset: bool) -> None:
    """Send a message, then drop the connection without a close frame (a RST for half)."""
    raw = await RawSocket.connect(f"{server.ws_url}/chat?token={token}")
    await raw.send_text("gone before the reply")
    await asyncio.sleep(0.05)
    if reset:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


async def _user(server: ServerChild, token: str) -> int:
    """The well-behaved user: messages answered."""
    answered = 0
    async with websockets.connect(f"{server.ws_url}/chat?token={token}") as ws:
        for n in range(USER_MESSAGES):
            await ws.send(f"message {n}")
            while True:
                frame = str(await asyncio.wait_for(ws.recv(), 30))
                if '"type":"message"' in frame.replace(" ", ""):
                    answered += 1
                    break
    return answered


async def _hammer(url: str) -> list[float]:
    """SCRAPES scrapes, 10 at a time; each one's milliseconds."""
    times: list[float] = []
    async with httpx.AsyncClient(timeout=30) as http:

        async def one() -> None:
            started = time.perf_counter()
            (await http.get(url)).raise_for_status()
            times.append(1000 * (time.perf_counter() - started))

        for _ in range(SCRAPES // 10):
            await asyncio.gather(*(one() for _ in range(10)))
    return times


def _settled(samples: Samples) -> bool:
    return (
        value(samples, "chat_sockets_open") == 0
        and value(samples, "chat_queue_waiting") == 0
        and value(samples, "chat_queue_pending") == 0
    )


async def test_vanishing_sockets_and_a_scrape_storm_leave_the_numbers_right(
    redis_url: str, model: ModelServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_url, openai_base_url=model.openai_base_url)
    worker_port = free_port()
    env = settings_env(
        settings,
        RATE_LIMIT_ADDRESS_MESSAGES="0",
        RATE_LIMIT_TOKEN_REQUESTS="0",
        MAX_SOCKETS_PER_ADDRESS="0",
    )
    server = ServerChild("server", env, tmp_path)
    worker = WorkerChild("worker", {**env, "WORKER_METRICS_PORT": str(worker_port)}, tmp_path)
    started = time.monotonic()
    try:
        await asyncio.to_thread(server.wait_ready)
        await asyncio.to_thread(worker.wait_ready)
        metrics, worker_metrics = f"{server.url}/metrics", f"http://127.0.0.1:{worker_port}/metrics"
        async with httpx.AsyncClient(base_url=server.url) as http:
            tokens = [await _token(http) for _ in range(VANISHING + 1)]
        user = asyncio.create_task(_user(server, tokens[0]))
        hammer = asyncio.create_task(_hammer(metrics))
        await asyncio.gather(
            *(_vanish(server, t, reset=n % 2 == 0) for n, t in enumerate(tokens[1:]))
        )
        answered, scrape_ms = await user, sorted(await hammer)
        final = await until(metrics, _settled, timeout=60)
        total = VANISHING + USER_MESSAGES
        replies = await until(
            worker_metrics,
            lambda s: value(s, "chat_replies_total", outcome="answered") >= total,
            timeout=60,
        )
        extra = await scrape(worker_metrics)
    finally:
        server.stop()
        worker.stop()
    assert answered == USER_MESSAGES
    assert _settled(final), {k: v for k, v in final.items() if k[0].startswith("chat_")}
    assert value(final, "chat_messages_received_total") == total
    assert value(replies, "chat_replies_total", outcome="answered") == total
    assert value(extra, "chat_first_token_seconds_count") == total
    assert value(extra, "chat_generations_in_flight") == 0
    p95 = scrape_ms[int(0.95 * (len(scrape_ms) - 1))]
    record(
        HostileRun(
            case="sockets vanish mid-message (FIN/RST) + /metrics scrape storm",
            load=f"{VANISHING} vanishing sockets, {SCRAPES} scrapes 10 at a time, "
            f"1 user x {USER_MESSAGES} messages",
            lost=USER_MESSAGES - answered,
            client_saw="user: every reply; scraper: 200 OK each time",
            figures={
                "sockets_open after": f"{value(final, 'chat_sockets_open'):g}",
                "received/answered": f"{total}/{total}",
                "scrape p50": f"{scrape_ms[len(scrape_ms) // 2]:.1f} ms",
                "scrape p95": f"{p95:.1f} ms",
            },
            seconds=time.monotonic() - started,
        )
    )
