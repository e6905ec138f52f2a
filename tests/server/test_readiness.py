"""/readyz on an external Redis that could evict the service's keys: ready, with a warning.

Any maxmemory-policy but noeviction lets Redis drop keys when it is full: allkeys-* drops
anything (the request stream, sessions), volatile-* drops keys with a TTL, i.e. the sessions.
Each test runs its own Redis, so CONFIG SET does not touch the shared one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import redis

from core import keys as keys_module
from launcher.redis_cluster import EmbeddedCluster
from launcher.redis_server import EmbeddedRedis, free_port
from server.main import create_app
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer


async def test_an_evicting_redis_is_ready_with_a_warning_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedRedis(free_port(), tmp_path, maxmemory="64mb") as redis_server:
        admin = redis.Redis(port=redis_server.port)
        admin.config_set("maxmemory-policy", "allkeys-lru")
        admin.close()
        with caplog.at_level(logging.WARNING):
            async with (
                InProcessServer(create_app(make_settings(redis_server.url))) as served,
                httpx.AsyncClient(base_url=served.url) as http,
            ):
                first = await http.get("/readyz")
                second = await http.get("/readyz")
    assert first.status_code == 200 and second.status_code == 200
    body = first.json()
    assert body["status"] == "ready"
    assert len(body["warnings"]) == 1 and "allkeys-lru" in body["warnings"][0]
    logged = [r for r in caplog.records if "allkeys-lru" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING


async def test_a_noeviction_redis_is_ready_without_warnings(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as redis_server:
        async with (
            InProcessServer(create_app(make_settings(redis_server.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            response = await http.get("/readyz")
    assert response.json() == {"status": "ready", "redis": {"mode": "single", "partitions": 24}}


async def test_readiness_does_not_build_keys_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as redis_server:
        async with (
            InProcessServer(create_app(make_settings(redis_server.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            built: list[str] = []
            original = keys_module.Keys.__init__

            def counting(self: keys_module.Keys, *args: object, **kwargs: object) -> None:
                built.append("Keys")
                original(self, *args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(keys_module.Keys, "__init__", counting)
            for _ in range(3):
                assert (await http.get("/readyz")).status_code == 200
    assert built == []


async def test_on_a_cluster_readiness_says_so(redis_cluster: EmbeddedCluster) -> None:
    """REDIS_MODE=auto: the server asks Redis (INFO cluster) and runs on the cluster."""
    async with (
        InProcessServer(create_app(make_settings(redis_cluster.url))) as served,
        httpx.AsyncClient(base_url=served.url) as http,
    ):
        response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.json()["redis"] == {
        "mode": "cluster",
        "masters": 3,
        "state": "ok",
        "partitions": 24,
    }
