"""GET /health (API v1): healthy with the package's version when ready, 503 when not."""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from pathlib import Path

import httpx

from launcher.redis_server import EmbeddedRedis, free_port
from server.main import create_app
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer


async def test_health_is_healthy_then_503_while_redis_is_down(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as restarted:
        async with (
            InProcessServer(create_app(make_settings(restarted.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            healthy = await http.get("/health")
            await asyncio.to_thread(restarted.stop)
            down = await http.get("/health")
            await asyncio.to_thread(restarted.start)
            again = await http.get("/health")
    assert healthy.status_code == 200
    assert healthy.json() == {"status": "healthy", "version": version("redis-chat")}
    assert down.status_code == 503
    body = down.json()
    assert (body["status"], body["version"]) == ("unhealthy", version("redis-chat"))
    assert "Redis unavailable" in body["detail"]
    assert again.status_code == 200


async def test_health_is_503_when_events_no_longer_reach_the_sockets(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as redis_server:
        app = create_app(make_settings(redis_server.url))
        async with InProcessServer(app) as served, httpx.AsyncClient(base_url=served.url) as http:
            await app.state.services.hub.aclose()  # its reader stops, as after a crash
            response = await http.get("/health")
    assert response.status_code == 503
    assert response.json()["detail"] == "event fan-out stopped (see the log)"
