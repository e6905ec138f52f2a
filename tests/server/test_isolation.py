"""One session can never read or write another's data (server and worker, real Redis)."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from tests.support.model_servers import ModelServer
from tests.support.stack import Stack


async def test_a_socket_never_receives_another_sessions_events(stack: Stack) -> None:
    a, b = await stack.new_session("A"), await stack.new_session("B")
    async with stack.socket(a) as mine, stack.socket(b) as theirs:
        await theirs.send("secret of B")
        await theirs.until("message")
        await mine.send("hello from A")
        await mine.until("message")
        await theirs.silence(0.3)
    seen_by_a = json.dumps(mine.events)
    assert "secret of B" not in seen_by_a
    assert all("hello from A" not in json.dumps(e) for e in theirs.events)


async def test_a_stop_on_one_session_does_not_stop_another(
    stack: Stack, model_server: ModelServer
) -> None:
    model_server.behaviour.token_delay = 0.1
    a, b = await stack.new_session("A"), await stack.new_session("B")
    async with stack.socket(a) as mine, stack.socket(b) as theirs:
        await theirs.send("one two three four five six")
        await theirs.until("token")
        # A stop from A, even one naming B's token in an extra field, is A's own stop.
        await mine.send('{"type": "stop"}')
        await mine.send(json.dumps({"type": "stop", "token": b}))
        reply = await theirs.until("message", timeout=30)
    assert "stopped" not in reply
    assert reply["msg"] == "echo: one two three four five six"


async def test_refresh_returns_only_the_tokens_own_session(stack: Stack) -> None:
    a, b = await stack.new_session("A"), await stack.new_session("B")
    async with stack.socket(a) as mine, stack.socket(b) as theirs:
        await mine.send("for A")
        await mine.until("message")
        await theirs.send("for B")
        await theirs.until("message")
    session_a = await stack.history(a)
    assert session_a["token"] == a and session_a["name"] == "A"
    assert [m["msg"] for m in session_a["messages"]] == ["for A", "echo: for A"]
    assert "for B" not in json.dumps(session_a)


async def test_another_sessions_ids_used_in_mine_do_nothing_to_it(
    stack: Stack, redis: Redis
) -> None:
    a, b = await stack.new_session("A"), await stack.new_session("B")
    async with stack.socket(b) as theirs:
        await theirs.send("B's question")
        b_ack = await theirs.until("ack")
        await theirs.until("message")
    before: Any = await redis.json().get(stack.keys.session(b))
    async with stack.socket(a) as mine, stack.socket(b) as watching:
        for frame in (
            {"type": "message", "msg": "x", "client_id": b_ack["id"]},
            {"type": "message", "msg": "y", "client_id": b, "token": b, "id": b_ack["id"]},
        ):
            await mine.send(json.dumps(frame))
            await mine.until("message")
        assert await watching.silence(0.3) == []
    after: Any = await redis.json().get(stack.keys.session(b))
    assert after == before
    mine_now = await stack.history(a)
    assert [m["msg"] for m in mine_now["messages"]] == ["x", "echo: x", "y", "echo: y"]
    assert all(m["id"] != b_ack["id"] for m in mine_now["messages"])


async def test_every_key_of_a_session_is_named_by_its_own_token(stack: Stack, redis: Redis) -> None:
    a, b = await stack.new_session("A"), await stack.new_session("B")
    async with stack.socket(a) as mine:
        await mine.send("hi")
        await mine.until("message")
    prefix = stack.settings.key_prefix
    keys: Any = await redis.keys(f"{prefix}:*")
    per_session = [key for key in keys if stack.keys.kind_of(key) is not None]
    assert per_session, "session A left keys"
    assert all(key.endswith(a) or key.endswith(b) for key in per_session)
    assert [key for key in per_session if key.endswith(b)] == [stack.keys.session(b)]
