"""Routes while Redis is unreachable: a clear 503 the client can retry, not a bare 500."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import InvalidStatus

from launcher.redis_server import EmbeddedRedis, free_port
from server.api.errors import REDIS_UNAVAILABLE
from server.main import create_app
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer


async def test_session_routes_answer_503_while_redis_is_down(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as restarted:
        async with (
            InProcessServer(create_app(make_settings(restarted.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
            await asyncio.to_thread(restarted.stop)
            refused = [
                await http.post("/token", params={"name": "Bob"}),
                await http.get("/refresh_token", params={"token": token}),
            ]
            await asyncio.to_thread(restarted.start)
            after = await http.get("/refresh_token", params={"token": token})
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json() == {"detail": REDIS_UNAVAILABLE}
        assert response.headers["retry-after"] == "1"
    # The session survived the restart (AOF) and the same client connection pool recovers.
    assert after.status_code == 200
    assert after.json()["token"] == token


async def test_api_v1_routes_answer_503_while_redis_is_down(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as restarted:
        settings = make_settings(restarted.url, master_token="m" * 32)
        async with (
            InProcessServer(create_app(settings)) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            key = (await http.post("/v1/users", json={"name": "Ann"})).json()["api_key"]
            user = {"Authorization": f"Bearer {key}"}
            token = (await http.post("/v1/conversations", json={}, headers=user)).json()["token"]
            await asyncio.to_thread(restarted.stop)
            refused = [
                await http.post("/v1/users", json={"name": "Bob"}),
                await http.get("/v1/conversations", headers=user),
                await http.delete(f"/v1/conversations/{token}", headers=user),
                await http.get("/v1/admin/stats", headers={"MASTER-TOKEN": "m" * 32}),
            ]
            schema = (await http.get("/openapi.json")).json()
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json() == {"detail": REDIS_UNAVAILABLE}
        assert response.headers["retry-after"] == "1"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                assert "503" in operation["responses"], (method, path)


async def test_socket_handshake_answers_503_while_redis_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as restarted:
        async with (
            InProcessServer(create_app(make_settings(restarted.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
            url = f"{served.url.replace('http', 'ws', 1)}/chat?token={token}"
            await asyncio.to_thread(restarted.stop)
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(url):
                    pass
            await asyncio.to_thread(restarted.start)
            ack = await _first_reply_on_a_socket_that_stays(url)
    response = refused.value.response
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert REDIS_UNAVAILABLE in response.body.decode()
    # One warning line, not a traceback per attempt.
    assert not [r for r in caplog.records if r.exc_info]
    assert '"type":"ack"' in str(ack)


async def _first_reply_on_a_socket_that_stays(url: str) -> str | bytes:
    """Like a client: reconnect until the server keeps the socket (the first one after the
    outage may be closed with 1012 when the server's Pub/Sub connection comes back)."""
    for _ in range(20):
        try:
            async with websockets.connect(url) as socket:
                await socket.send("back again")
                return await asyncio.wait_for(socket.recv(), 10)
        except websockets.ConnectionClosed:
            await asyncio.sleep(0.2)
    raise AssertionError("the server never kept a socket after the outage")


class _HubThatCannotSubscribe:
    """Stands in for the event hub when Redis never confirms a subscription."""

    @contextlib.asynccontextmanager
    async def subscribe(self, token: str) -> AsyncIterator[None]:
        raise TimeoutError("no confirmation from Redis")
        yield


async def test_socket_handshake_answers_503_when_subscribing_fails(redis_url: str) -> None:
    app = create_app(make_settings(redis_url))
    async with (
        InProcessServer(app) as served,
        httpx.AsyncClient(base_url=served.url) as http,
    ):
        token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
        app.state.services = dataclasses.replace(app.state.services, hub=_HubThatCannotSubscribe())
        url = f"{served.url.replace('http', 'ws', 1)}/chat?token={token}"
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        services = app.state.services
        left_open = await services.redis.zcard(services.keys.sockets(token))
    assert refused.value.response.status_code == 503
    assert left_open == 0  # the socket's slot was given back


async def test_a_redis_refusal_is_one_warning_line_per_message_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis at maxmemory (OOM) refuses every write: each refused message gets
    `service_unavailable`, and the log gets one line for it, not a traceback (a flood of
    tracebacks under load hides what is going on and fills disks)."""
    with EmbeddedRedis(free_port(), tmp_path) as own:
        async with (
            InProcessServer(create_app(make_settings(own.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
            url = f"{served.url.replace('http', 'ws', 1)}/chat?token={token}"
            async with websockets.connect(url) as ws:
                await http.get("/readyz")
                admin = Redis.from_url(own.url)
                try:
                    await admin.config_set("maxmemory", "1")
                    caplog.clear()
                    events = []
                    for text in ("one", "two"):
                        await ws.send(text)
                        events.append(json.loads(await ws.recv()))
                    stop = json.dumps({"type": "stop"})
                    await ws.send(stop)
                    events.append(json.loads(await ws.recv()))
                finally:
                    await admin.config_set("maxmemory", "0")
                    await admin.aclose()
    assert [e["code"] for e in events] == ["service_unavailable"] * 3
    chat_log = [r for r in caplog.records if r.name == "server.api.routes.chat"]
    refusals = [r for r in chat_log if r.levelname != "INFO"]
    assert len(refusals) == 3, [r.getMessage() for r in chat_log]
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in refusals)
    assert all("OutOfMemoryError" in r.getMessage() for r in refusals)
