"""The server stays up whatever one client does: slow readers, memory hogs, floods of sockets
and stops, a full backlog, huge histories (docs/protocol.md, "Bad inputs and failures")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pydantic
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from core.config import Settings
from core.keys import Keys
from core.models import new_id
from core.store import BacklogFull, SessionStore
from server.__main__ import WS_MAX_FRAME_BYTES
from server.main import create_app
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer
from tests.support.model_servers import ModelServer
from tests.support.raw_ws import RawSocket, close_codes
from tests.support.sessions import add_human_message
from tests.support.stack import Stack, running_stack


def robust(redis_url: str, model_server: ModelServer, **overrides: Any) -> Settings:
    return make_settings(redis_url, openai_base_url=model_server.openai_base_url, **overrides)


async def open_sockets(redis: Redis, settings: Settings, token: str) -> int:
    return int(await redis.zcard(Keys.from_settings(settings).sockets(token)))


async def until(check: Any, timeout: float, what: str) -> None:
    """Poll the async `check` until it is true; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


# --- A client that stops reading ------------------------------------------------------------


@pytest.fixture
async def long_replies(model_server: ModelServer) -> AsyncIterator[ModelServer]:
    """Replies of about 8 MB in 2,000 pieces: more than every buffer between server and a
    client that does not read."""
    model_server.behaviour.reply_override = " ".join(["x" * 4000] * 2000)
    yield model_server


async def test_a_client_that_stops_reading_is_closed_and_its_socket_released(
    redis_url: str, long_replies: ModelServer, redis: Redis
) -> None:
    settings = robust(
        redis_url,
        long_replies,
        socket_send_timeout_seconds=1.0,
        outbox_max_bytes=256 * 1024 * 1024,  # only the send timeout can act here
        max_reply_chars=10**7,
    )
    async with running_stack(settings) as stack:
        token = await stack.new_session()
        reader = await RawSocket.connect(f"{stack.server.ws_url}/chat?token={token}")
        try:
            await reader.send_text("tell me everything")  # and never read again
            await until(lambda: _answered(stack, token), 90, "the reply was stored")
            await until(
                lambda: _is_zero(open_sockets(redis, settings, token)),
                30,
                "the slow socket's lease was released",
            )
            # The server gave up on the connection: closed or reset, not left hanging.
            await reader.read_until_closed(timeout=30)
        finally:
            reader.close()
        # The server is fine: another client of the session chats as usual.
        long_replies.behaviour.reply_override = None
        async with stack.socket(token) as chat:
            await chat.send("still there?")
            assert (await chat.until("message", timeout=60))["msg"] == "echo: still there?"


class _HideTheProtocol:
    """Middleware that wraps `receive`, as some do: the route cannot reach uvicorn's transport
    to abort it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def wrapped() -> Any:
            return await receive()

        await self.app(scope, wrapped, send)


async def test_without_an_abort_the_handler_still_returns_and_releases_the_socket(
    redis_url: str, long_replies: ModelServer, redis: Redis
) -> None:
    settings = robust(
        redis_url,
        long_replies,
        socket_send_timeout_seconds=1.0,
        outbox_max_bytes=64 * 1024 * 1024,
        max_reply_chars=10**7,
    )
    app = create_app(settings)
    app.add_middleware(_HideTheProtocol)
    async with InProcessServer(app, ws_max_size=WS_MAX_FRAME_BYTES) as served:
        stack = Stack(settings, served)
        stack.add_worker()
        try:
            token = await stack.new_session()
            reader = await RawSocket.connect(f"{served.ws_url}/chat?token={token}")
            try:
                await reader.send_text("tell me everything")
                await until(lambda: _is_zero(open_sockets(redis, settings, token)), 60, "released")
            finally:
                reader.close()
        finally:
            await stack.stop_workers()


async def _answered(stack: Stack, token: str) -> bool:
    history = await stack.history(token)
    return any(m["source"] == "bot" for m in history["messages"])


async def _is_zero(count: Any) -> bool:
    return int(await count) == 0


async def test_an_outbox_over_its_byte_limit_closes_the_socket_with_1013(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    settings = robust(redis_url, model_server, outbox_max_bytes=256 * 1024)
    async with running_stack(settings, workers=0) as stack:
        token = await stack.new_session()
        keys = Keys.from_settings(settings)
        slow = await RawSocket.connect(f"{stack.server.ws_url}/chat?token={token}")
        try:
            # 6 MB of events at once, to a client that reads nothing for a second: more than
            # the kernel's buffers and the outbox's 256 KiB together.
            event = {"type": "token", "id": new_id(), "reply_to": new_id(), "delta": "x" * 20_000}
            for _ in range(300):
                await redis.spublish(keys.events(token), json.dumps(event))
            await asyncio.sleep(1)
            received = await slow.read_until_closed(timeout=30)  # now it reads
        finally:
            slow.close()
        assert close_codes(received) == [1013]
        await until(lambda: _is_zero(open_sockets(redis, settings, token)), 30, "released")


# --- Abuse ------------------------------------------------------------------------------------


async def test_sockets_per_address_are_limited(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    settings = robust(redis_url, model_server, max_sockets_per_address=3)
    async with running_stack(settings, workers=0) as stack:
        tokens = [await stack.new_session(f"user{n}") for n in range(4)]
        async with stack.socket(tokens[0]), stack.socket(tokens[1]), stack.socket(tokens[2]):
            async with websockets.connect(f"{stack.server.ws_url}/chat?token={tokens[3]}") as extra:
                refusal = json.loads(await asyncio.wait_for(extra.recv(), 10))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(extra.recv(), 10)
            assert extra.close_code == 1008
            assert await open_sockets(redis, settings, tokens[3]) == 0
        # Closed sockets give their places back.
        async with stack.socket(tokens[3]) as fourth:
            await fourth.send("hello")
            assert (await fourth.until("ack"))["msg"] == "hello"
    assert refusal["code"] == "too_many_connections"
    assert "3 open connections from your address" in refusal["detail"]


async def test_stop_commands_are_rate_limited_and_not_passed_on(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    settings = robust(
        redis_url, model_server, rate_limit_stop_requests=2, rate_limit_window_seconds=60
    )
    keys = Keys.from_settings(settings)
    async with running_stack(settings, workers=0) as stack, redis.pubsub() as control:
        await control.ssubscribe(*keys.control_channels)
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            for _ in range(4):
                await chat.send('{"type": "stop"}')
            refusals = [await chat.until("error") for _ in range(2)]
            await chat.send("still works")
            await chat.until("ack")
        # Every stop was handled before the ack of the next message: the channel has them all.
        passed = 0
        while (message := await control.get_message(timeout=0.5)) is not None:
            passed += message["type"] == "smessage"
    assert passed == 2
    for refusal in refusals:
        assert refusal["code"] == "rate_limited"
        assert refusal["retry_after"] >= 1
        assert refusal["detail"].startswith("Too many stop requests")


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("::ffff:192.0.2.7", "192.0.2.7", True),
        ("192.0.2.7", "192.0.2.8", False),
        ("testclient", "testclient", True),
    ],
)
def test_ipv6_clients_are_grouped_by_64(one: str, other: str, same: bool) -> None:
    from server.api.guards import address_group

    assert (address_group(one) == address_group(other)) is same


async def test_an_ipv6_64_shares_one_rate_limit(redis_url: str, model_server: ModelServer) -> None:
    settings = robust(
        redis_url, model_server, rate_limit_token_requests=1, forwarded_allow_ips=["127.0.0.1"]
    )
    async with (
        InProcessServer(create_app(settings), proxy_headers=False) as served,
        httpx.AsyncClient(base_url=served.url) as http,
    ):
        answers = [
            (
                await http.post(
                    "/token", params={"name": "x"}, headers={"X-Forwarded-For": address}
                )
            ).status_code
            for address in ("2001:db8:1:2::1", "2001:db8:1:2::abcd", "2001:db8:1:3::1")
        ]
    assert answers == [200, 429, 200]  # the second is in the first's /64, the third is not


def test_a_wildcard_proxy_list_is_refused_in_production() -> None:
    with pytest.raises(pydantic.ValidationError, match="FORWARDED_ALLOW_IPS"):
        Settings(_env_file=None, app_env="production", forwarded_allow_ips="*")
    # Development allows it (a local proxy setup), and a listed proxy is fine in production.
    assert Settings(_env_file=None, forwarded_allow_ips="*").forwarded_allow_ips == ["*"]
    listed = Settings(_env_file=None, app_env="production", forwarded_allow_ips="10.0.0.0/8")
    assert listed.forwarded_allow_ips == ["10.0.0.0/8"]


def test_the_outbox_must_hold_a_whole_reply() -> None:
    with pytest.raises(pydantic.ValidationError, match="OUTBOX_MAX_BYTES"):
        Settings(_env_file=None, outbox_max_bytes=64 * 1024, max_reply_chars=8000)
    assert Settings(_env_file=None).outbox_max_bytes == 1024 * 1024


# --- A full backlog -------------------------------------------------------------------------


async def test_a_full_backlog_is_an_error_naming_the_message(
    redis_url: str, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def full(*_: object, **__: object) -> BacklogFull:
        return BacklogFull(10)

    monkeypatch.setattr(SessionStore, "queue_message", full)
    async with running_stack(robust(redis_url, model_server), workers=0) as stack:
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            await chat.send(json.dumps({"type": "message", "msg": "one more", "client_id": "c7"}))
            refusal = await chat.until("error")
            await chat.ws.ping()  # still open
    assert refusal == {
        "type": "error",
        "code": "backlog_full",
        "detail": "This session already has 10 messages waiting for a reply; wait for an "
        "answer and send it again",
        "client_id": "c7",
    }


# --- /refresh_token bounds ------------------------------------------------------------------


async def test_refresh_can_return_only_the_newest_messages(stack: Stack, redis: Redis) -> None:
    await stack.stop_workers()  # no replies in between
    token = await stack.new_session()
    store = SessionStore(redis, stack.settings)
    for n in range(5):
        await add_human_message(store, token, f"m{n}")
    async with httpx.AsyncClient(base_url=stack.url) as http:
        whole = (await http.get("/refresh_token", params={"token": token})).json()
        newest = await http.get("/refresh_token", params={"token": token, "limit": 2})
        refused = await http.get("/refresh_token", params={"token": token, "limit": 0})
    assert [m["msg"] for m in whole["messages"]] == [f"m{n}" for n in range(5)]
    assert [m["msg"] for m in newest.json()["messages"]] == ["m3", "m4"]
    assert refused.status_code == 422


async def test_a_large_refresh_answer_is_compressed(stack: Stack, redis: Redis) -> None:
    await stack.stop_workers()
    token = await stack.new_session()
    store = SessionStore(redis, stack.settings)
    for n in range(30):
        await add_human_message(store, token, f"{n} " + "a" * 3000)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.get(
            "/refresh_token", params={"token": token}, headers={"Accept-Encoding": "gzip"}
        )
        raw = await http.get(
            "/refresh_token", params={"token": token}, headers={"Accept-Encoding": "identity"}
        )
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) < len(raw.content) / 10
    assert "content-encoding" not in raw.headers
    assert response.json() == raw.json()
