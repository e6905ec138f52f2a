"""Conversations (API v1) over HTTP, against the real stack: who may touch one, titles,
listing with its cursor and repair, reset, and delete while a reply streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from core.config import Settings
from core.models import MAX_TITLE_CHARS, new_id
from server.api.routes.conversations import REPAIR_GRACE_MS
from tests.support.accounts import auth, register
from tests.support.model_servers import ModelServer
from tests.support.stack import Stack


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        yield client


async def _create(http: httpx.AsyncClient, key: str | None = None, **body: str) -> dict[str, Any]:
    response = await http.post("/v1/conversations", json=body, headers=auth(key) if key else {})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_a_keys_conversation_is_its_own_and_404_to_anyone_else(
    http: httpx.AsyncClient,
) -> None:
    _, ann = await register(http, "Ann")
    _, bob = await register(http, "Bob")
    mine = await _create(http, ann, title="Plans")
    assert mine["name"] == "Ann" and mine["title"] == "Plans" and mine["messages"] == []
    path = f"/v1/conversations/{mine['token']}"
    assert (await http.get(path, headers=auth(ann))).json() == mine
    for headers in (auth(bob), {}, auth(mine["token"]), auth(new_id())):
        for method in ("GET", "DELETE"):
            refused = await http.request(method, path, headers=headers)
            assert refused.status_code == 404, (headers, refused.text)
            assert refused.json() == {"detail": "Conversation not found"}
        assert (await http.patch(path, json={"title": "x"}, headers=headers)).status_code == 404
        assert (await http.post(f"{path}/reset", headers=headers)).status_code == 404
    assert (await http.get(path, headers=auth(ann))).json()["title"] == "Plans"


async def test_an_anonymous_conversation_opens_with_its_own_token_only(
    http: httpx.AsyncClient,
) -> None:
    _, ann = await register(http)
    anonymous = await _create(http)
    assert anonymous["name"] == "Anonymous" and "user_id" not in anonymous
    other = await _create(http, name="Zed")
    path = f"/v1/conversations/{anonymous['token']}"
    assert (await http.get(path, headers=auth(anonymous["token"]))).status_code == 200
    ok = await http.get(path, headers={"ACCESS-TOKEN": anonymous["token"]})
    assert ok.status_code == 200
    for headers in ({}, auth(other["token"]), auth(ann)):
        assert (await http.get(path, headers=headers)).status_code == 404
    # A tutorial session is a conversation too.
    tutorial = (await http.post("/token", params={"name": "Tut"})).json()
    got = await http.get(f"/v1/conversations/{tutorial['token']}", headers=auth(tutorial["token"]))
    assert got.json() == tutorial


@pytest.mark.parametrize(
    "credential", ["chat_" + "x" * 43, "chat_", "not-a-uuid", "Bearer", "00000000-0000"]
)
async def test_a_credential_that_opens_nothing_is_401(
    http: httpx.AsyncClient, credential: str
) -> None:
    for request in (
        http.get("/v1/conversations", headers=auth(credential)),
        http.post("/v1/conversations", json={}, headers=auth(credential)),
        http.get(f"/v1/conversations/{new_id()}", headers={"ACCESS-TOKEN": credential}),
        http.post("/token", params={"name": "Ann"}, headers=auth(credential)),
    ):
        response = await request
        assert response.status_code == 401, response.text
        assert response.json() == {"detail": "Invalid credentials"}
        assert response.headers["www-authenticate"] == "Bearer"


async def test_listing_needs_a_key_and_a_revoked_key_opens_nothing(
    http: httpx.AsyncClient, stack: Stack
) -> None:
    assert (await http.get("/v1/conversations")).status_code == 401
    anonymous = await _create(http)
    assert (
        await http.get("/v1/conversations", headers=auth(anonymous["token"]))
    ).status_code == 401
    user_id, key = await register(http)
    mine = await _create(http, key)
    services = stack.server.app.state.services
    await services.accounts.revoke(user_id)
    assert (await http.get("/v1/conversations", headers=auth(key))).status_code == 401
    path = f"/v1/conversations/{mine['token']}"
    assert (await http.get(path, headers=auth(key))).status_code == 401


async def test_token_with_a_key_attaches_the_session_to_its_user(http: httpx.AsyncClient) -> None:
    user_id, key = await register(http)
    session = (await http.post("/token", params={"name": "Ann"}, headers=auth(key))).json()
    assert session["user_id"] == user_id
    listed = (await http.get("/v1/conversations", headers=auth(key))).json()
    assert [row["conversation_id"] for row in listed["conversations"]] == [session["token"]]
    seed = await http.post("/token", params={"name": "Ann"}, headers={"ACCESS-TOKEN": key})
    assert seed.json()["user_id"] == user_id
    plain = (await http.post("/token", params={"name": "Ann"})).json()
    assert set(plain) == {"token", "name", "session_start", "messages"}


@pytest.mark.parametrize(
    ("title", "reason"),
    [
        ("", "Enter a valid title"),
        ("   ", "Enter a valid title"),
        ("\u200b", "Enter a valid title"),
        ("x" * (MAX_TITLE_CHARS + 1), f"at most {MAX_TITLE_CHARS} characters"),
        ("a\x1bb", "no control characters"),
        ("line\nbreak", "no control characters"),
        ("bad \ufffd", "valid UTF-8"),
    ],
)
async def test_title_rules(http: httpx.AsyncClient, title: str, reason: str) -> None:
    _, key = await register(http)
    mine = await _create(http, key)
    path = f"/v1/conversations/{mine['token']}"
    refused = await http.patch(path, json={"title": title}, headers=auth(key))
    assert refused.status_code == 400, refused.text
    assert refused.json()["detail"]["loc"] == "title" and reason in refused.json()["detail"]["msg"]
    created = await http.post("/v1/conversations", json={"title": title}, headers=auth(key))
    assert created.status_code == 400
    named = await http.post("/v1/conversations", json={"name": title}, headers=auth(key))
    assert named.status_code == 400 and named.json()["detail"]["loc"] == "name"
    assert (await http.get(path, headers=auth(key))).json().get("title") is None


async def test_renaming_trims_and_tells_the_open_sockets(
    http: httpx.AsyncClient, stack: Stack
) -> None:
    _, key = await register(http)
    mine = await _create(http, key)
    path = f"/v1/conversations/{mine['token']}"
    async with stack.socket(mine["token"]) as socket:
        renamed = await http.patch(path, json={"title": f"  {'é' * 199}✓  "}, headers=auth(key))
        assert renamed.status_code == 200 and renamed.json()["title"] == "é" * 199 + "✓"
        event = await socket.until("conversation")
    assert event == {"type": "conversation", "change": "title", "title": "é" * 199 + "✓"}
    assert (await http.patch(path, json={}, headers=auth(key))).status_code == 422


async def test_the_list_is_newest_activity_first_with_counts_and_a_cursor(
    http: httpx.AsyncClient, stack: Stack
) -> None:
    _, key = await register(http)
    made = []
    for i in range(3):
        made.append((await _create(http, key, name=f"c{i}"))["token"])
        await asyncio.sleep(0.01)
    async with stack.socket(made[0]) as socket:
        await socket.send("What is Redis?")
        await socket.finals(1)
    first = (await http.get("/v1/conversations?limit=2", headers=auth(key))).json()
    rows = first["conversations"]
    assert [row["conversation_id"] for row in rows] == [made[0], made[2]]
    top = rows[0]
    assert top["title"] == "What is Redis?" and top["message_count"] == 2
    assert datetime.fromisoformat(top["updated"]) > datetime.fromisoformat(top["created"])
    assert rows[1]["message_count"] == 0 and rows[1]["title"] is None
    second = await http.get(
        "/v1/conversations", params={"limit": 2, "cursor": first["next_cursor"]}, headers=auth(key)
    )
    assert [row["conversation_id"] for row in second.json()["conversations"]] == [made[1]]
    assert second.json()["next_cursor"] is None
    # Any well-formed cursor is a position: after the oldest, nothing.
    nowhere = await http.get(
        "/v1/conversations", params={"cursor": "1." + new_id()}, headers=auth(key)
    )
    assert nowhere.json() == {"conversations": [], "next_cursor": None}


@pytest.mark.parametrize(
    "cursor",
    [
        "%%%",
        "bm90LWEtY3Vyc29y",
        "12.abc",
        "-1." + new_id(),
        "1." + new_id().upper(),
        " 1." + new_id(),
    ],
)
async def test_a_bad_cursor_is_400(http: httpx.AsyncClient, cursor: str) -> None:
    _, key = await register(http)
    response = await http.get("/v1/conversations", params={"cursor": cursor}, headers=auth(key))
    assert response.status_code == 400, response.text
    assert "cursor" in response.json()["detail"]


async def test_the_list_drops_and_repairs_entries_whose_conversation_is_gone(
    http: httpx.AsyncClient, stack: Stack, redis: Redis
) -> None:
    user_id, key = await register(http)
    kept = (await _create(http, key))["token"]
    expired = (await _create(http, key))["token"]
    await redis.delete(stack.keys.session(expired))  # as a TTL would
    index = stack.server.app.state.services.store.index
    await index.add(user_id, expired, int(time.time() * 1000) - REPAIR_GRACE_MS - 1000)
    being_made = new_id()  # its entry is written, its document not yet
    await index.add(user_id, being_made, int(time.time() * 1000))
    listed = (await http.get("/v1/conversations", headers=auth(key))).json()
    assert [row["conversation_id"] for row in listed["conversations"]] == [kept]
    assert sorted(await index.tokens(user_id)) == sorted([kept, being_made])


async def test_reset_empties_the_history_and_keeps_the_title(
    http: httpx.AsyncClient, stack: Stack
) -> None:
    _, key = await register(http)
    token = (await _create(http, key))["token"]
    async with stack.socket(token) as socket:
        await socket.send("hello")
        await socket.finals(1)
        reset = await http.post(f"/v1/conversations/{token}/reset", headers=auth(key))
        assert reset.status_code == 200
        assert reset.json()["messages"] == [] and reset.json()["title"] == "hello"
        assert await socket.until("conversation") == {"type": "conversation", "change": "reset"}
    assert (await stack.history(token))["messages"] == []


async def test_deleting_while_a_reply_streams_closes_the_sockets_and_stores_nothing(
    http: httpx.AsyncClient,
    stack: Stack,
    model_server: ModelServer,
    redis: Redis,
    stack_settings: Settings,
) -> None:
    model_server.behaviour.token_delay = 0.1
    model_server.behaviour.reply_override = " ".join(f"word{i}" for i in range(100))
    _, key = await register(http)
    token = (await _create(http, key))["token"]
    prefix = stack_settings.key_prefix
    async with stack.socket(token) as socket, stack.socket(token) as second:
        await socket.send("tell me a long story")
        await socket.until("token")
        deleted = await http.delete(f"/v1/conversations/{token}", headers=auth(key))
        assert deleted.status_code == 204 and deleted.content == b""
        for ws in (socket, second):
            assert await ws.until("conversation") == {"type": "conversation", "change": "deleted"}
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.silence(5)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1008,
                "Conversation deleted",
            )
            assert not [e for e in ws.events if e["type"] == "message"]
    # The worker's reply is never stored, and the stream entry is acknowledged and gone.
    async with asyncio.timeout(10):
        while await redis.xlen(stack.keys.requests_for(token)) or await redis.exists(
            stack.keys.lease(token)
        ):
            await asyncio.sleep(0.05)
    pending: Any = await redis.xpending(stack.keys.requests_for(token), stack.keys.group)
    assert pending["pending"] == 0
    left = [name async for name in redis.scan_iter(match=f"{prefix}:*{token}*")]
    assert not [name for name in left if ":session:" in name or ":sockets:" in name], left
    # What remains is short-lived state with a TTL: the stop time, the message rate.
    for name in left:
        assert 0 < await redis.pttl(name) <= stack_settings.session_ttl_seconds * 1000, name
    assert (await http.get(f"/v1/conversations/{token}", headers=auth(key))).status_code == 404
    assert (await http.delete(f"/v1/conversations/{token}", headers=auth(key))).status_code == 404
    assert (await http.get("/v1/conversations", headers=auth(key))).json()["conversations"] == []


async def test_a_refused_read_does_not_renew_the_conversation(
    http: httpx.AsyncClient, stack: Stack, redis: Redis
) -> None:
    """Only who may touch a conversation keeps it alive: someone else's 404 must not be a
    way to hold it (or to learn that it exists) by its TTL."""
    _, ann = await register(http, "Ann")
    _, bob = await register(http, "Bob")
    owned = (await _create(http, ann))["token"]
    anonymous = (await http.post("/token", params={"name": "Cy"})).json()["token"]
    keys = stack.server.app.state.services.store.keys
    for token, refused in ((owned, auth(bob)), (owned, auth(owned)), (anonymous, auth(bob))):
        await redis.expire(keys.session(token), 100)
        response = await http.get(f"/v1/conversations/{token}", headers=refused)
        assert response.status_code == 404
        assert 0 < await redis.ttl(keys.session(token)) <= 100
    assert (await http.get(f"/v1/conversations/{owned}", headers=auth(ann))).status_code == 200
    assert await redis.ttl(keys.session(owned)) > 100
