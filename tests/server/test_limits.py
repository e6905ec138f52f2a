"""Rate limits, the socket cap per session and the Origin check, against a real Redis; the
limits shared by two server apps (two processes' worth of state) on one Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.config import Settings
from core.keys import Keys
from server.__main__ import WS_MAX_FRAME_BYTES
from server.main import create_app
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer
from tests.support.model_servers import ModelServer
from tests.support.stack import ChatSocket, Stack, running_stack


@asynccontextmanager
async def two_servers(
    settings: Settings, *, workers: int = 0
) -> AsyncIterator[tuple[Stack, Stack]]:
    """Two apps with their own Redis clients, Pub/Sub and socket registries, one Redis."""
    async with (
        running_stack(settings, workers=workers) as first,
        InProcessServer(create_app(settings), ws_max_size=WS_MAX_FRAME_BYTES) as served,
    ):
        yield first, Stack(settings, served)


async def outcome(chat: ChatSocket, text: str) -> dict[str, Any]:
    """Send `text` and return its ack, or the error that refused it (other tabs' acks and
    notices are skipped)."""
    await chat.send(text)
    async with asyncio.timeout(15):
        while True:
            event = await chat.next_event()
            if (event["type"] == "ack" and event["msg"] == text) or (
                event["type"] == "error" and "reply_to" not in event
            ):
                return event


def limited(redis_url: str, model_server: ModelServer, **overrides: Any) -> Settings:
    return make_settings(redis_url, openai_base_url=model_server.openai_base_url, **overrides)


# --- Socket flood --------------------------------------------------------------------------------


async def test_a_flood_is_rate_limited_and_leaves_no_trace(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    settings = limited(
        redis_url, model_server, rate_limit_session_messages=5, rate_limit_window_seconds=60
    )
    async with running_stack(settings, workers=0) as stack:
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            for n in range(12):
                await chat.send(f"flood {n}")
            acks: list[dict[str, Any]] = []
            refusals: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while len(acks) + len(refusals) < 12:
                    event = await chat.next_event()
                    if event["type"] == "ack":
                        acks.append(event)
                    elif event["type"] == "error":
                        refusals.append(event)
            # The socket is still open and the session still works.
            await chat.ws.ping()
        history = await stack.history(token)
    assert [a["msg"] for a in acks] == [f"flood {n}" for n in range(5)]
    assert len(refusals) == 7
    for refusal in refusals:
        assert refusal["code"] == "rate_limited"
        assert "reply_to" not in refusal
        assert refusal["retry_after"] >= 1
        assert refusal["detail"] == (
            f"Too many messages: wait {refusal['retry_after']} s and send it again"
        )
    # Nothing half-written: exactly the acknowledged messages are stored and queued.
    assert [m["msg"] for m in history["messages"]] == [f"flood {n}" for n in range(5)]
    assert await redis.xlen(Keys.from_settings(settings).requests_for(token)) == 5


async def test_default_limits_never_limit_normal_chat(stack: Stack) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        finals = []
        # Two bursts of MAX_UNANSWERED_MESSAGES (10), 20 messages within one rate window.
        for burst in range(2):
            for n in range(10):
                await chat.send(f"quick {burst} {n}")
            finals += await chat.finals(10, timeout=90)
    assert all(f["type"] == "message" for f in finals)


async def test_session_limit_holds_across_two_servers(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = limited(
        redis_url, model_server, rate_limit_session_messages=4, rate_limit_window_seconds=60
    )
    async with two_servers(settings) as (one, two):
        token = await one.new_session()
        async with one.socket(token) as left, two.socket(token) as right:
            answers = [(await outcome(left, f"left {n}"))["type"] for n in range(3)]
            answers.append((await outcome(right, "right 0"))["type"])
            refused = await outcome(right, "right 1")
            refused_too = await outcome(left, "left 3")
        history = await one.history(token)
    assert answers == ["ack"] * 4
    assert refused["code"] == "rate_limited"
    assert refused_too["code"] == "rate_limited"
    assert len(history["messages"]) == 4


async def test_a_refused_message_command_names_its_client_id(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = limited(
        redis_url, model_server, rate_limit_session_messages=1, rate_limit_window_seconds=60
    )
    async with running_stack(settings, workers=0) as stack:
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            accepted = await outcome(chat, "first")
            await chat.send(json.dumps({"type": "message", "msg": "second", "client_id": "tab-2"}))
            async with asyncio.timeout(15):
                refused = await chat.next_event()
                while refused["type"] != "error":
                    refused = await chat.next_event()
    assert accepted["type"] == "ack"
    assert refused["code"] == "rate_limited"
    assert refused["client_id"] == "tab-2"  # the sending tab knows which bubble failed


async def test_address_limit_holds_across_sessions_and_servers(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = limited(
        redis_url, model_server, rate_limit_address_messages=3, rate_limit_window_seconds=60
    )
    async with two_servers(settings) as (one, two):
        tokens = [await one.new_session(name) for name in ("A", "B")]
        async with one.socket(tokens[0]) as a, two.socket(tokens[1]) as b:
            answers = [
                (await outcome(chat, f"hello {n}"))["type"] for n, chat in enumerate((a, b, a, b))
            ]
    assert answers == ["ack", "ack", "ack", "error"]


# --- HTTP -----------------------------------------------------------------------------------------


async def test_token_requests_are_limited_per_address_across_servers(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = limited(redis_url, model_server, rate_limit_token_requests=3)
    async with (
        two_servers(settings) as (one, two),
        httpx.AsyncClient(base_url=one.url) as left,
        httpx.AsyncClient(base_url=two.url) as right,
    ):
        statuses = [(await left.post("/token", params={"name": "A"})).status_code]
        statuses.append((await right.post("/token", params={"name": "B"})).status_code)
        statuses.append((await left.post("/token", params={"name": "C"})).status_code)
        refused = await right.post("/token", params={"name": "D"})
        # Other endpoints are not affected.
        assert (await right.get("/test")).status_code == 200
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    wait = int(refused.headers["Retry-After"])
    assert wait >= 1
    assert refused.json() == {"detail": f"Too many requests: try again in {wait} s"}


async def test_refresh_requests_are_limited(redis_url: str, model_server: ModelServer) -> None:
    settings = limited(redis_url, model_server, rate_limit_refresh_requests=2)
    async with running_stack(settings, workers=0) as stack:
        token = await stack.new_session()
        async with httpx.AsyncClient(base_url=stack.url) as http:
            answers = [
                (await http.get("/refresh_token", params={"token": token})).status_code
                for _ in range(3)
            ]
    assert answers == [200, 200, 429]


async def test_zero_disables_the_http_limit(redis_url: str, model_server: ModelServer) -> None:
    settings = limited(redis_url, model_server, rate_limit_token_requests=0)
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        answers = {(await http.post("/token", params={"name": "x"})).status_code for _ in range(30)}
    assert answers == {200}


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarded_for_counts_only_from_trusted_proxies(
    redis_url: str, model_server: ModelServer, trusted: bool
) -> None:
    settings = limited(
        redis_url,
        model_server,
        rate_limit_token_requests=1,
        forwarded_allow_ips=["127.0.0.1"] if trusted else [],
    )
    # As `python -m server` runs it: uvicorn's own proxy-header handling off, the app's on.
    async with (
        InProcessServer(create_app(settings), proxy_headers=False) as served,
        httpx.AsyncClient(base_url=served.url) as http,
    ):
        answers = [
            (
                await http.post(
                    "/token", params={"name": "x"}, headers={"X-Forwarded-For": f"203.0.113.{n}"}
                )
            ).status_code
            for n in range(3)
        ]
    # Trusted: three different clients behind the proxy. Untrusted: one client (the peer).
    assert answers == ([200, 200, 200] if trusted else [200, 429, 429])


# --- Sockets per session --------------------------------------------------------------------------


async def test_too_many_sockets_across_servers_then_one_closes(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    settings = limited(redis_url, model_server, max_sockets_per_session=2)
    async with two_servers(settings) as (one, two):
        token = await one.new_session()
        async with one.socket(token), two.socket(token) as second:
            async with websockets.connect(f"{one.server.ws_url}/chat?token={token}") as third:
                refusal = await asyncio.wait_for(third.recv(), 10)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(third.recv(), 10)
            assert third.close_code == 1008
            assert third.close_reason == "Too many open connections for this session"
            # Another session is not affected.
            other = await two.new_session("B")
            async with two.socket(other) as theirs:
                await theirs.ws.ping()
            await second.ws.close()
            # The closed socket no longer counts: a new one is served.
            async with asyncio.timeout(10):
                while await redis.zcard(Keys.from_settings(settings).sockets(token)) > 1:
                    await asyncio.sleep(0.02)
            async with one.socket(token) as fresh:
                await fresh.send("hello")
                assert (await fresh.until("ack"))["msg"] == "hello"
    assert refusal == (
        '{"type":"error","code":"too_many_connections",'
        '"detail":"This session already has 2 open connections; close one and reconnect"}'
    )


async def test_sockets_of_a_crashed_server_stop_counting(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    settings = limited(redis_url, model_server, max_sockets_per_session=1)
    async with running_stack(settings, workers=0) as stack:
        token = await stack.new_session()
        key = Keys.from_settings(settings).sockets(token)
        # What a server that died leaves behind: a member whose lease ran out.
        await redis.zadd(key, {"dead-server-socket": int(time.time() * 1000) - 1})
        async with stack.socket(token) as chat:
            await chat.ws.ping()
            assert await redis.zrange(key, 0, -1) != ["dead-server-socket"]
            assert await redis.zcard(key) == 1


async def test_the_server_renews_its_socket_leases(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    settings = limited(redis_url, model_server, max_sockets_per_session=3)
    async with running_stack(settings, workers=0) as stack:
        token = await stack.new_session()
        key = Keys.from_settings(settings).sockets(token)
        async with stack.socket(token):
            held: Any = await redis.zrange(key, 0, -1, withscores=True)
            [(member, before)] = held
            await redis.zadd(key, {member: before - 20_000})  # as if not renewed for 20 s
            await stack.server.app.state.services.sockets.refresh()
            renewed: Any = await redis.zrange(key, 0, -1, withscores=True)
        assert renewed[0][1] >= before
        # Closed: uncounted.
        async with asyncio.timeout(10):
            while await redis.zcard(key):
                await asyncio.sleep(0.02)


# --- Origin ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("SAME", True),
        ("http://localhost:5173", True),
        ("http://127.0.0.1:4173", True),
        ("https://evil.example", False),
        ("http://localhost:1", False),
        ("null", False),
    ],
)
async def test_origin_check_on_the_handshake(
    stack: Stack, origin: str | None, allowed: bool
) -> None:
    token = await stack.new_session()
    if origin == "SAME":
        origin = stack.url
    url = f"{stack.server.ws_url}/chat?token={token}"
    headers = {} if origin is None else {"Origin": origin}
    if allowed:
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send("hi")
            assert '"type":"ack"' in str(await asyncio.wait_for(ws.recv(), 10))
    else:
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403


async def test_listed_and_wildcard_origins(redis_url: str, model_server: ModelServer) -> None:
    for allowed_origins, origin, expected in (
        (["https://chat.example"], "https://chat.example", True),
        (["https://chat.example"], "http://localhost:5173", False),
        (["*"], "https://anything.example", True),
    ):
        settings = limited(redis_url, model_server, allowed_origins=allowed_origins)
        async with running_stack(settings, workers=0) as stack:
            token = await stack.new_session()
            url = f"{stack.server.ws_url}/chat?token={token}"
            try:
                async with websockets.connect(url, additional_headers={"Origin": origin}):
                    opened = True
            except InvalidStatus:
                opened = False
        assert opened is expected, (allowed_origins, origin)
