"""POST /v1/chat against the real stack: a server, a worker and a model server over HTTP.

Every refusal is checked for what it leaves behind as well as for its status: nothing is
stored for a refused message, and a repeated client_id stores the message once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.accounts import AccountStore
from core.config import Settings
from core.redis import create_redis
from core.store import SessionStore
from launcher.redis_server import EmbeddedRedis, free_port
from server.api.errors import REDIS_UNAVAILABLE
from server.main import create_app
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer
from tests.support.model_servers import HttpError, ModelServer
from tests.support.stack import Stack, running_stack


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        yield client


async def new_key(settings: Settings, name: str = "Ann") -> str:
    redis = create_redis(settings)
    try:
        _, api_key = await AccountStore(redis, SessionStore(redis, settings).keys).register(name)
    finally:
        await redis.aclose()
    return api_key


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def humans(history: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in history["messages"] if m["source"] == "human"]


async def test_a_new_conversation_answers_201_with_the_stored_reply(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    response = await http.post("/v1/chat", json={"message": "  hello  "})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["response"] == "echo: hello"
    assert body["sources"] == []
    history = await stack.history(body["conversation_id"])
    human, bot = history["messages"]
    assert (human["id"], human["msg"]) == (body["message_id"], "hello")
    assert (bot["id"], bot["reply_to"]) == (body["reply_id"], human["id"])
    assert bot["msg"] == "echo: hello"
    assert history["title"] == "hello"
    assert "user_id" not in history


async def test_an_anonymous_conversation_is_continued_with_its_token(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    token = await stack.new_session()
    body = {"message": "again", "conversation_id": token}
    refused = await http.post("/v1/chat", json=body)
    assert refused.status_code == 404
    assert refused.json() == {"detail": "Conversation not found"}
    response = await http.post("/v1/chat", json=body, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["conversation_id"] == token
    assert [m["msg"] for m in (await stack.history(token))["messages"]] == ["again", "echo: again"]


async def test_a_key_owns_the_new_conversation_and_another_key_gets_404(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    ann, bob = await new_key(stack.settings, "Ann"), await new_key(stack.settings, "Bob")
    created = await http.post("/v1/chat", json={"message": "mine"}, headers=bearer(ann))
    assert created.status_code == 201, created.text
    conversation = created.json()["conversation_id"]
    again = {"message": "more", "conversation_id": conversation}
    assert (await http.post("/v1/chat", json=again, headers=bearer(ann))).status_code == 200
    other = await http.post("/v1/chat", json=again, headers=bearer(bob))
    assert other.status_code == 404
    token_only = await http.post("/v1/chat", json=again, headers=bearer(conversation))
    assert token_only.status_code == 404  # an owned conversation opens only to its owner's key
    history = await stack.history(conversation)
    assert [m["msg"] for m in humans(history)] == ["mine", "more"]
    assert history["user_id"]


async def test_a_wrong_key_is_401_and_stores_nothing(stack: Stack, http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat", json={"message": "hi"}, headers=bearer("chat_" + "x" * 43)
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": "Invalid credentials"}


@pytest.mark.parametrize(
    ("message", "status", "code"),
    [
        ("   ", 400, "bad_request"),
        ("bell \x07", 400, "bad_request"),
        ("x" * 4001, 413, "too_large"),
    ],
)
async def test_a_bad_message_is_refused_like_on_the_socket(
    stack: Stack, http: httpx.AsyncClient, message: str, status: int, code: str
) -> None:
    token = await stack.new_session()
    body = {"message": message, "conversation_id": token}
    response = await http.post("/v1/chat", json=body, headers=bearer(token))
    assert response.status_code == status
    assert response.json()["code"] == code
    assert (await stack.history(token))["messages"] == []


async def test_a_bad_client_id_is_400(stack: Stack, http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat", json={"message": "hi", "client_id": ""})
    assert response.status_code == 400
    assert response.json()["code"] == "bad_request"


async def test_a_repeated_client_id_stores_once_and_gets_the_same_reply(
    stack: Stack, http: httpx.AsyncClient, model_server: ModelServer
) -> None:
    token = await stack.new_session()
    body = {"message": "once", "conversation_id": token, "client_id": "c-1"}
    model_server.behaviour.token_delay = 0.1  # the retry arrives while the reply streams
    first, retry = await asyncio.gather(
        http.post("/v1/chat", json=body, headers=bearer(token)),
        http.post("/v1/chat", json=body, headers=bearer(token)),
    )
    late = await http.post("/v1/chat", json=body, headers=bearer(token))  # answered already
    answers = [r.json() for r in (first, retry, late)]
    assert [r.status_code for r in (first, retry, late)] == [200, 200, 200]
    assert len({(a["message_id"], a["reply_id"], a["response"]) for a in answers}) == 1
    history = await stack.history(token)
    assert [m["msg"] for m in history["messages"]] == ["once", "echo: once"]
    assert len(model_server.requests) == 1


async def test_a_repeated_client_id_with_a_key_goes_to_the_conversation_it_created(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    key = await new_key(stack.settings)
    body = {"message": "start", "client_id": "first"}
    first = await http.post("/v1/chat", json=body, headers=bearer(key))
    retry = await http.post("/v1/chat", json=body, headers=bearer(key))
    assert first.status_code == retry.status_code == 201
    assert first.json() == retry.json()
    history = await stack.history(first.json()["conversation_id"])
    assert [m["msg"] for m in history["messages"]] == ["start", "echo: start"]


async def test_a_model_error_is_502_and_stored(
    stack: Stack, http: httpx.AsyncClient, model_server: ModelServer
) -> None:
    model_server.behaviour.script.append(HttpError(400, "bad request"))
    token = await stack.new_session()
    body = {"message": "fail", "conversation_id": token}
    response = await http.post("/v1/chat", json=body, headers=bearer(token))
    assert response.status_code == 502, response.text
    error = response.json()
    assert error["code"] == "model_error"
    assert error["conversation_id"] == token
    bot = (await stack.history(token))["messages"][1]
    assert bot["reply_to"] == error["message_id"] and bot["error"]["code"] == "model_error"


async def test_over_the_session_rate_limit_is_429_with_retry_after(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = make_settings(
        redis_url, openai_base_url=model_server.openai_base_url, rate_limit_session_messages=1
    )
    async with running_stack(settings) as stack, httpx.AsyncClient(base_url=stack.url) as http:
        token = await stack.new_session()
        body = {"message": "one", "conversation_id": token}
        assert (await http.post("/v1/chat", json=body, headers=bearer(token))).status_code == 200
        refused = await http.post("/v1/chat", json=body, headers=bearer(token))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["code"] == "rate_limited"
        assert len(humans(await stack.history(token))) == 1


async def test_a_full_backlog_is_429_and_stores_nothing(redis_url: str) -> None:
    settings = make_settings(redis_url, max_unanswered_messages=1)
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        token = await stack.new_session()
        store = SessionStore(create_redis(settings), settings)
        try:
            await store.queue_message(token, "waiting")
        finally:
            await store.redis.aclose()
        body = {"message": "one more", "conversation_id": token}
        refused = await http.post("/v1/chat", json=body, headers=bearer(token))
        assert refused.status_code == 429
        assert refused.json()["code"] == "backlog_full"
        assert refused.headers["retry-after"] == "1"
        assert [m["msg"] for m in humans(await stack.history(token))] == ["waiting"]


async def test_with_no_worker_it_is_504_and_the_reply_is_stored_later(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = make_settings(
        redis_url, openai_base_url=model_server.openai_base_url, http_reply_timeout_seconds=1.0
    )
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        response = await http.post("/v1/chat", json={"message": "anyone?"})
        assert response.status_code == 504, response.text
        error = response.json()
        assert error["code"] == "timeout"
        stack.add_worker()
        for _ in range(100):
            history = await stack.history(error["conversation_id"])
            if len(history["messages"]) == 2:
                break
            await asyncio.sleep(0.1)
        human, bot = history["messages"]
        assert human["id"] == error["message_id"]
        assert (bot["reply_to"], bot["msg"]) == (human["id"], "echo: anyone?")


async def test_missed_events_are_made_up_from_the_history(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = make_settings(redis_url, openai_base_url=model_server.openai_base_url)
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):
        hub = stack.server.app.state.services.hub
        asking = asyncio.create_task(http.post("/v1/chat", json={"message": "still there?"}))
        for _ in range(100):
            if hub.channels:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        hub._on_reconnect()  # Pub/Sub came back after a break: events may be lost
        stack.add_worker()
        response = await asyncio.wait_for(asking, 20)
    assert response.status_code == 201, response.text
    assert response.json()["response"] == "echo: still there?"


async def test_a_conversation_deleted_while_its_reply_is_awaited_is_404(
    stack: Stack, http: httpx.AsyncClient, model_server: ModelServer
) -> None:
    model_server.behaviour.token_delay = 0.2
    token = await stack.new_session()
    body = {"message": "one two three four five", "conversation_id": token}
    asking = asyncio.create_task(http.post("/v1/chat", json=body, headers=bearer(token)))
    await asyncio.sleep(0.5)
    assert await stack.server.app.state.services.store.delete(token)
    response = await asking
    assert response.status_code == 404
    assert response.json() == {"detail": "Conversation not found"}


async def test_while_redis_is_down_it_is_503_with_retry_after(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as restarted:
        async with (
            InProcessServer(create_app(make_settings(restarted.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            await asyncio.to_thread(restarted.stop)
            refused = await http.post("/v1/chat", json={"message": "hello?"})
            streamed = await http.post("/v1/chat/stream", json={"message": "hello?"})
            await asyncio.to_thread(restarted.start)
    for response in (refused, streamed):
        assert response.status_code == 503, response.text
        assert response.json() == {"detail": REDIS_UNAVAILABLE}
        assert response.headers["retry-after"] == "1"


async def test_a_slash_over_http_is_a_chat_message_not_a_command(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """Slash commands are the socket's; over HTTP the text is sent to the model as is."""
    response = await http.post("/v1/chat", json={"message": "/reset"})
    assert response.status_code == 201, response.text
    assert response.json()["response"] == "echo: /reset"
    history = await stack.history(response.json()["conversation_id"])
    assert [m["msg"] for m in humans(history)] == ["/reset"]
