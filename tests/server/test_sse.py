"""POST /v1/chat/stream against the real stack: Server-Sent Events of the socket's events."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from redis.asyncio import Redis

from core.keys import Keys
from core.models import client_message_id, new_id
from tests.conftest import make_settings
from tests.support.model_servers import HttpError, ModelServer
from tests.support.raw_ws import RawSocket
from tests.support.stack import Stack, running_stack


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        yield client


async def read_stream(
    http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every event's data, and every comment line, until the stream ends."""
    events: list[dict[str, Any]] = []
    comments: list[str] = []
    async with http.stream("POST", "/v1/chat/stream", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
            elif line.startswith(":"):
                comments.append(line)
    return events, comments


async def until_answered(stack: Stack, token: str) -> list[dict[str, Any]]:
    for _ in range(150):
        messages: list[dict[str, Any]] = (await stack.history(token))["messages"]
        if len(messages) == 2:
            return messages
        await asyncio.sleep(0.1)
    raise AssertionError("the reply was never stored")


async def test_the_stream_carries_the_socket_events_and_ends_done(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    events, _ = await read_stream(http, {"message": "stream me please"})
    kinds = [event.get("type") for event in events]
    assert kinds[0] == "ack" and kinds[-2] == "message" and kinds[-1] is None
    tokens = [event for event in events if event.get("type") == "token"]
    assert tokens and all(event["token"] == event["delta"] for event in tokens)
    ack, final, done = events[0], events[-2], events[-1]
    assert "".join(event["token"] for event in tokens) == final["msg"] == "echo: stream me please"
    assert done["done"] is True
    assert done["reply_id"] == final["id"] and done["message_id"] == ack["id"]
    messages = (await stack.history(done["conversation_id"]))["messages"]
    assert [m["id"] for m in messages] == [ack["id"], final["id"]]


async def test_a_refusal_before_storing_is_an_http_status(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    response = await http.post("/v1/chat/stream", json={"message": "x" * 5000})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] == "too_large"
    missing = await http.post(
        "/v1/chat/stream",
        json={"message": "hi", "conversation_id": "69a68d0c-1547-41ee-8b49-8e56d609ca33"},
    )
    assert missing.status_code == 404


async def test_a_model_error_ends_with_the_error_event_and_a_done_with_the_error(
    stack: Stack, http: httpx.AsyncClient, model_server: ModelServer
) -> None:
    model_server.behaviour.script.append(HttpError(400, "no"))
    events, _ = await read_stream(http, {"message": "fail"})
    error, done = events[-2], events[-1]
    assert error["type"] == "error" and error["code"] == "model_error"
    assert done["done"] is True and "reply_id" not in done
    assert done["error"]["code"] == "model_error"


async def test_a_client_that_disconnects_does_not_cancel_the_reply(
    stack: Stack, http: httpx.AsyncClient, model_server: ModelServer
) -> None:
    model_server.behaviour.token_delay = 0.1
    token = await stack.new_session()
    body = {"message": "one two three four five six", "conversation_id": token}
    headers = {"Authorization": f"Bearer {token}"}
    async with http.stream("POST", "/v1/chat/stream", json=body, headers=headers) as response:
        async for line in response.aiter_lines():
            if '"type":"token"' in line:
                break  # leave mid-reply
    human, bot = await until_answered(stack, token)
    assert bot["msg"] == "echo: one two three four five six" and "stopped" not in bot
    assert bot["reply_to"] == human["id"]
    hub = stack.server.app.state.services.hub  # the stream let go of the session's events
    for _ in range(50):
        if hub.channels == 0:
            break
        await asyncio.sleep(0.05)
    assert hub.channels == 0


async def test_with_no_worker_it_keeps_alive_then_ends_with_a_timeout(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = make_settings(
        redis_url,
        openai_base_url=model_server.openai_base_url,
        http_reply_timeout_seconds=1.0,
        sse_heartbeat_seconds=0.2,
    )
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):
        events, comments = await read_stream(http, {"message": "anyone?"})
        assert len(comments) >= 3 and set(comments) == {": keepalive"}
        kinds = [event.get("type") for event in events]
        assert kinds == ["ack", "notice", "error", None]
        assert events[1]["code"] == "queued" and events[2]["code"] == "timeout"
        done = events[-1]
        assert done["error"]["code"] == "timeout"
        stack.add_worker()
        human, bot = await until_answered(stack, done["conversation_id"])
        assert bot["reply_to"] == human["id"] == done["message_id"]


async def test_missed_events_are_made_up_from_the_history(
    redis_url: str, model_server: ModelServer
) -> None:
    """The hub's Pub/Sub connection came back after a break (events may have been lost): the
    stream reads the reply from the history and still ends with it and a done."""
    settings = make_settings(redis_url, openai_base_url=model_server.openai_base_url)
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):
        hub = stack.server.app.state.services.hub
        reading = asyncio.create_task(read_stream(http, {"message": "lost and found"}))
        for _ in range(100):
            if hub.channels:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the ack is through
        hub._on_reconnect()  # what the subscriber calls after a lost connection
        stack.add_worker()
        events, _ = await asyncio.wait_for(reading, 20)
    final, done = events[-2], events[-1]
    assert final["type"] == "message" and final["msg"] == "echo: lost and found"
    assert done["done"] is True and done["reply_id"] == final["id"]


async def test_a_title_change_is_passed_on_and_a_delete_ends_the_stream(
    stack: Stack, http: httpx.AsyncClient, model_server: ModelServer
) -> None:
    model_server.behaviour.token_delay = 0.2
    store = stack.server.app.state.services.store
    token = await stack.new_session()
    headers = {"Authorization": f"Bearer {token}"}
    body = {"message": "a b c d e f g h i j", "conversation_id": token}
    events: list[dict[str, Any]] = []
    async with http.stream("POST", "/v1/chat/stream", json=body, headers=headers) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(json.loads(line.removeprefix("data: ")))
            if events[-1].get("type") == "token" and len(events) == 2:
                await store.set_title(token, "renamed")
            elif events[-1].get("change") == "title":
                await store.delete(token)
    changes = [event["change"] for event in events if event.get("type") == "conversation"]
    assert changes == ["title", "deleted"]
    done = events[-1]
    assert done["done"] is True and "reply_id" not in done and "error" not in done
    assert not any(event.get("type") == "message" for event in events)
    await asyncio.sleep(2.5)  # the generation was cancelled; nothing was stored anywhere
    assert await store.get(token) is None


async def test_a_reader_too_slow_for_its_outbox_still_gets_the_reply_from_the_history(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    """6 MB of token events for a stream whose client reads nothing for a second: more than
    the kernel's buffers and the outbox's 256 KiB. The outbox drops them (memory stays
    bounded) and the stream, once the client reads, ends with the stored reply and a done."""
    settings = make_settings(
        redis_url, openai_base_url=model_server.openai_base_url, outbox_max_bytes=256 * 1024
    )
    async with running_stack(settings, workers=0) as stack:
        token = await stack.new_session()
        message_id = client_message_id(token, "slow-1")
        body = json.dumps({"message": "slowly", "conversation_id": token, "client_id": "slow-1"})
        slow = await open_raw_stream(stack.url, body, token)
        try:
            hub = stack.server.app.state.services.hub
            for _ in range(100):
                if hub.channels and humans_of(await stack.history(token)):
                    break
                await asyncio.sleep(0.05)
            event = {"type": "token", "id": new_id(), "reply_to": message_id, "delta": "x" * 20_000}
            channel = Keys.from_settings(settings).events(token)
            for _ in range(300):
                await redis.spublish(channel, json.dumps(event))
            await asyncio.sleep(1)
            stack.add_worker()
            received = (await slow.read_until_closed(timeout=30)).decode(errors="replace")
        finally:
            slow.close()
    assert received.count('"type":"token"') < 300  # the outbox dropped what it could not hold
    assert '"type":"message"' in received and '"msg":"echo: slowly"' in received
    assert '"done":true' in received and received.rstrip().endswith("0")  # the last chunk


async def open_raw_stream(url: str, body: str, token: str) -> RawSocket:
    """POST /v1/chat/stream from a bare TCP socket with a small receive buffer, which reads
    only when told to (httpx reads in the background)."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
    request = (
        f"POST /v1/chat/stream HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
    )
    await loop.sock_sendall(sock, request.encode())
    return RawSocket(sock)


def humans_of(history: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in history["messages"] if m["source"] == "human"]
