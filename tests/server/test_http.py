"""The HTTP endpoints, served for real by uvicorn against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from core.config import Settings
from core.keys import Keys
from core.models import new_id
from launcher.redis_server import EmbeddedRedis, free_port
from server.main import create_app
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer
from tests.support.stack import Stack


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        yield http


async def test_tutorial_test_endpoint(client: httpx.AsyncClient) -> None:
    response = await client.get("/test")
    assert response.status_code == 200
    assert response.json() == {"msg": "API is Online"}


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text


async def test_readiness_reports_redis_down(tmp_path: Path) -> None:
    # The app starts against a live Redis, which then goes away.
    with EmbeddedRedis(free_port(), tmp_path) as doomed:
        async with (
            InProcessServer(create_app(make_settings(doomed.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            assert (await http.get("/readyz")).status_code == 200
            doomed.kill()
            response = await http.get("/readyz")
            assert (await http.get("/healthz")).status_code == 200
    assert response.status_code == 503
    assert "unavailable" in response.json()["detail"].lower()


async def test_token_creates_a_session(
    client: httpx.AsyncClient, redis: Redis, stack_settings: Settings
) -> None:
    response = await client.post("/token", params={"name": "  Ann  "})
    assert response.status_code == 200
    session = response.json()
    assert set(session) == {"token", "name", "session_start", "messages"}
    assert session["name"] == "Ann"
    assert session["messages"] == []
    assert datetime.fromisoformat(session["session_start"]).utcoffset() is not None
    key = Keys.from_settings(stack_settings).session(session["token"])
    ttl = await redis.ttl(key)
    assert stack_settings.session_ttl_seconds - 5 < ttl <= stack_settings.session_ttl_seconds


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
async def test_blank_name_is_refused(client: httpx.AsyncClient, name: str) -> None:
    response = await client.post("/token", params={"name": name})
    assert response.status_code == 400
    assert response.json() == {"detail": {"loc": "name", "msg": "Enter a valid name"}}


async def test_missing_name_is_a_validation_error(client: httpx.AsyncClient) -> None:
    assert (await client.post("/token")).status_code == 422


async def test_name_length_limit(client: httpx.AsyncClient) -> None:
    assert (await client.post("/token", params={"name": "x" * 100})).status_code == 200
    response = await client.post("/token", params={"name": "x" * 101})
    assert response.status_code == 400
    assert response.json()["detail"]["loc"] == "name"
    assert "100" in response.json()["detail"]["msg"]


@pytest.mark.parametrize("name", ["Zoë", "李雷", "🙂 smile", "O'Brien <b>"])
async def test_unicode_names_round_trip(client: httpx.AsyncClient, name: str) -> None:
    token = (await client.post("/token", params={"name": name})).json()["token"]
    session = (await client.get("/refresh_token", params={"token": token})).json()
    assert session["name"] == name


async def test_refresh_token_returns_the_history(stack: Stack, client: httpx.AsyncClient) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send("hi")
        await chat.until("message")
    response = await client.get("/refresh_token", params={"token": token})
    assert response.status_code == 200
    session = response.json()
    assert session["token"] == token
    assert [(m["source"], m["msg"]) for m in session["messages"]] == [
        ("human", "hi"),
        ("bot", "echo: hi"),
    ]
    fields = {"id", "source", "msg", "timestamp", "reply_to", "tokens_used"}
    assert all(set(m) <= fields for m in session["messages"])


@pytest.mark.parametrize("token", [new_id(), "not-a-token", "*", "chat:session:x"])
async def test_refresh_unknown_token(client: httpx.AsyncClient, token: str) -> None:
    response = await client.get("/refresh_token", params={"token": token})
    assert response.status_code == 400
    assert response.json() == {"detail": "Session expired or does not exist"}


async def test_refresh_missing_token_is_a_validation_error(client: httpx.AsyncClient) -> None:
    assert (await client.get("/refresh_token")).status_code == 422


async def test_session_expires_after_its_ttl(redis_url: str) -> None:
    settings = make_settings(redis_url, session_ttl_seconds=1)
    async with (
        InProcessServer(create_app(settings)) as served,
        httpx.AsyncClient(base_url=served.url) as http,
    ):
        token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
        assert (await http.get("/refresh_token", params={"token": token})).status_code == 200
        await asyncio.sleep(1.5)
        response = await http.get("/refresh_token", params={"token": token})
    assert response.status_code == 400


async def test_activity_renews_the_ttl(
    stack: Stack, redis: Redis, stack_settings: Settings
) -> None:
    token = await stack.new_session()
    key = Keys.from_settings(stack_settings).session(token)
    await redis.expire(key, 5)
    async with stack.socket(token) as chat:
        await redis.expire(key, 5)
        await chat.send("keep me alive")
        await chat.until("message")
    assert await redis.ttl(key) > stack_settings.session_ttl_seconds - 10


async def test_the_page_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    # The basic page's script is a file (the CSP allows no inline script).
    assert '<script src="app.js">' in response.text
    assert "/chat" in (await client.get("/app.js")).text


async def test_readiness_fails_when_the_event_fan_out_stopped(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    hub = stack.server.app.state.services.hub
    await hub.aclose()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert "fan-out" in response.json()["detail"]


# --- Odd names and tokens (the table in docs/protocol.md) -----------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "👨‍👩‍👧 family",  # emoji joined by U+200D ZERO WIDTH JOINER
        "مرحبا",  # right-to-left script
        "\u200f\u05e9\u05dc\u05d5\u05dd",  # RIGHT-TO-LEFT MARK, then Hebrew
        "a\u200bb",  # a zero-width space inside visible text
        "\u202eevil",  # a bidi override: kept as text; clients render names isolated
        "x" * 100,
    ],
)
async def test_odd_but_usable_names_are_kept_exactly(client: httpx.AsyncClient, name: str) -> None:
    response = await client.post("/token", params={"name": name})
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    session = (await client.get("/refresh_token", params={"token": token})).json()
    assert session["name"] == name


@pytest.mark.parametrize(
    ("raw_query", "message"),
    [
        ("name=%E2%80%8B", "Enter a valid name"),  # only a zero-width space
        ("name=%E2%80%8B%E2%80%8D%20%E2%81%A0", "Enter a valid name"),  # only invisible chars
        ("name=a%00b", "Enter a valid name (no control characters)"),  # NUL
        ("name=a%09b", "Enter a valid name (no control characters)"),  # tab inside
        ("name=a%0Ab", "Enter a valid name (no control characters)"),  # newline inside
        ("name=a%1Bb", "Enter a valid name (no control characters)"),  # ESC
        ("name=a%C2%85b", "Enter a valid name (no control characters)"),  # C1 control (NEL)
        ("name=%ED%A0%80", "Enter a valid name (it must be valid UTF-8 text)"),  # lone surrogate
        ("name=x%FFy", "Enter a valid name (it must be valid UTF-8 text)"),  # not UTF-8 at all
        ("name=%EF%BF%BD", "Enter a valid name (it must be valid UTF-8 text)"),  # U+FFFD itself
        ("name=" + "y" * 10_000, "Enter a valid name (at most 100 characters)"),
        ("name=" + "%F0%9F%99%82" * 101, "Enter a valid name (at most 100 characters)"),
    ],
)
async def test_unusable_names_get_400_and_create_nothing(
    client: httpx.AsyncClient, redis: Redis, stack_settings: Settings, raw_query: str, message: str
) -> None:
    response = await client.post(f"/token?{raw_query}")
    assert response.status_code == 400, response.text
    assert response.json() == {"detail": {"loc": "name", "msg": message}}
    assert await redis.keys(f"{stack_settings.key_prefix}:*:session:*") == []


async def test_huge_queries_are_refused_without_a_500(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        response = await client.post("/token", params={"name": "z" * 60_000})
    assert response.status_code == 400
    # Over what httpx will send: a raw request line of 1 MB. uvicorn refuses it (or drops the
    # connection); the app never sees it.
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.server.port)
    try:
        writer.write(f"POST /token?name={'z' * 1_000_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert status_line == b"" or status_line.split()[1].startswith(b"4"), status_line


@pytest.mark.parametrize(
    "raw_token",
    [
        "%ED%A0%80",
        "%00",
        "69A68D0C-1547-41EE-8B49-8E56D609CA33",  # upper case: not the canonical form
        "{69a68d0c-1547-41ee-8b49-8e56d609ca33}",
        "69a68d0c-1547-11ee-8b49-8e56d609ca33",  # a UUID1
        "69a68d0c-1547-41ee-8b49-8e56d609ca33" + "0" * 10_000,
    ],
)
async def test_malformed_tokens_get_400(client: httpx.AsyncClient, raw_token: str) -> None:
    response = await client.get(f"/refresh_token?token={raw_token}")
    assert response.status_code == 400
    assert response.json() == {"detail": "Session expired or does not exist"}


async def test_an_expired_token_gets_400(
    client: httpx.AsyncClient, redis: Redis, stack_settings: Settings
) -> None:
    token = (await client.post("/token", params={"name": "Ann"})).json()["token"]
    await redis.delete(Keys.from_settings(stack_settings).session(token))
    response = await client.get("/refresh_token", params={"token": token})
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("OPTIONS", "/token?name=Ann", "POST"),
        ("GET", "/token", "POST"),
        ("PUT", "/refresh_token", "GET"),
        ("DELETE", "/v1/chat", "POST"),
        ("GET", "/v1/chat/stream", "POST"),
    ],
)
async def test_a_method_an_api_path_lacks_is_405_with_the_paths_methods(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    """Not the chat page's static files answering (they said `Allow: GET, HEAD`)."""
    response = await client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow


async def test_the_page_is_still_served_at_the_root(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert (await client.get("/no-such-file.js")).status_code == 404
