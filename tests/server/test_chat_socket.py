"""The chat socket against a real Redis and a real worker (answering through a local
OpenAI-compatible server that echoes the last user message)."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import InvalidStatus

from core.models import new_id
from tests.conftest import make_settings
from tests.support.model_servers import ModelServer
from tests.support.stack import Stack, running_stack


async def test_plain_text_gets_ack_tokens_and_final_message(any_stack: Stack) -> None:
    token = await any_stack.new_session()
    async with any_stack.socket(token) as chat:
        await chat.send("hello there")
        ack = await chat.until("ack")
        reply = await chat.until("message")
    assert ack["msg"] == "hello there"
    tokens = [e for e in chat.events if e["type"] == "token"]
    assert tokens, "the backend streams, so tokens come before the final message"
    assert all(t["reply_to"] == ack["id"] and t["id"] == reply["id"] for t in tokens)
    assert "".join(t["delta"] for t in tokens).strip() == reply["msg"]
    assert reply["msg"] == "echo: hello there"
    assert reply["reply_to"] == ack["id"]
    assert reply["source"] == "bot"

    history = await any_stack.history(token)
    assert [(m["source"], m["msg"]) for m in history["messages"]] == [
        ("human", "hello there"),
        ("bot", "echo: hello there"),
    ]
    assert history["messages"][1]["reply_to"] == ack["id"]


async def test_ack_echoes_the_client_id_to_every_tab(stack: Stack) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as tab1, stack.socket(token) as tab2:
        await tab1.send('{"type": "message", "msg": "tagged", "client_id": "bubble-7"}')
        ack1, ack2 = await tab1.until("ack"), await tab2.until("ack")
        await tab1.send("untagged")
        plain = await tab1.until("ack")
    assert ack1 == ack2
    assert ack1["client_id"] == "bubble-7" and ack1["msg"] == "tagged"
    assert "client_id" not in plain


async def test_json_message_command_and_order_of_replies(any_stack: Stack) -> None:
    token = await any_stack.new_session()
    async with any_stack.socket(token) as chat:
        for n in range(4):
            await chat.send(f'{{"type": "message", "msg": "number {n}"}}')
        replies = await chat.finals(4)
    assert [r["msg"] for r in replies] == [f"echo: number {n}" for n in range(4)]
    history = await any_stack.history(token)
    humans = [m for m in history["messages"] if m["source"] == "human"]
    bots = {m["reply_to"]: m for m in history["messages"] if m["source"] == "bot"}
    assert [bots[h["id"]]["msg"] for h in humans] == [f"echo: number {n}" for n in range(4)]


async def test_prompt_holds_the_last_four_messages(stack: Stack, model_server: ModelServer) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        for n in range(3):
            await chat.send(f"m{n}")
            await chat.until("message")
    last = model_server.requests[-1]["messages"]
    assert [t["role"] for t in last] == ["system", "assistant", "user", "assistant", "user"]
    assert [t["content"] for t in last[1:]] == ["echo: m0", "m1", "echo: m1", "m2"]


@pytest.mark.parametrize("query", ["", "?token=", "?token=not-a-uuid", f"?token={new_id()}"])
async def test_handshake_refused_without_a_live_session(stack: Stack, query: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{stack.server.ws_url}/chat{query}"):
            pass
    assert refused.value.response.status_code == 403


async def test_handshake_refused_for_an_expired_session(stack: Stack, redis: Redis) -> None:
    token = await stack.new_session()
    await redis.delete(stack.keys.session(token))
    with pytest.raises(InvalidStatus):
        async with websockets.connect(f"{stack.server.ws_url}/chat?token={token}"):
            pass


async def test_session_expiring_while_connected_is_reported_and_closed(
    stack: Stack, redis: Redis
) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await redis.delete(stack.keys.session(token))
        await chat.send("anyone?")
        error = await chat.until("error")
        assert error["code"] == "session_expired"
        await chat.ws.wait_closed()
    assert chat.ws.close_code == 1008


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("", "bad_request"),
        ("   ", "bad_request"),
        ("x" * 4001, "too_large"),
        (b"\x00\x01binary", "bad_request"),
        ('{"type": "stop"', "bad_request"),
        ('{"type": "dance"}', "bad_request"),
        ('{"type": "message", "msg": 42}', "bad_request"),
        ('{"type":"message","msg":"\\ud800"}', "bad_request"),  # a lone surrogate
        ('{"type": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}", "bad_request"),  # deep nesting
        ('{"type": "message", "msg": "x", "a": ' + "[" * 3000 + "]" * 3000 + "}", "bad_request"),
        ("[" * 3000 + "]" * 3000, "too_large"),  # not a command: text, and too long
        ("ring \x07 the bell", "bad_request"),  # a control character
    ],
)
async def test_bad_frames_get_an_error_and_lose_nothing(
    stack: Stack, redis: Redis, frame: str | bytes, code: str
) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send(frame)
        error = await chat.until("error")
        assert error["code"] == code
        assert error["detail"]
        assert "reply_to" not in error
        # Nothing half-written: no history entry, no stream entry, no ack.
        assert (await stack.history(token))["messages"] == []
        assert await redis.xlen(stack.keys.requests_for(token)) == 0
        assert [e["type"] for e in chat.events] == ["error"]
        # The connection and the session are intact: the next message works.
        await chat.send("still fine?")
        reply = await chat.until("message")
    assert reply["msg"] == "echo: still fine?"
    history = await stack.history(token)
    assert [m["msg"] for m in history["messages"]] == ["still fine?", "echo: still fine?"]


async def test_every_socket_of_a_session_gets_its_events_and_no_other(any_stack: Stack) -> None:
    mine, other = await any_stack.new_session("A"), await any_stack.new_session("B")
    async with (
        any_stack.socket(mine) as tab1,
        any_stack.socket(mine) as tab2,
        any_stack.socket(other) as them,
    ):
        await tab1.send("from tab one")
        first = await tab1.until("message")
        second = await tab2.until("message")
        assert first == second
        assert [e["type"] for e in tab2.events if e["type"] != "token"] == ["ack", "message"]
        assert await them.silence(0.5) == []


async def test_stop_keeps_the_partial_reply_marked(
    any_stack: Stack, model_server: ModelServer
) -> None:
    model_server.behaviour.token_delay = 0.2
    token = await any_stack.new_session()
    async with any_stack.socket(token) as chat:
        await chat.send("one two three four five six seven eight nine ten")
        await chat.until("token")
        await chat.send('{"type": "stop"}')
        reply = await chat.until("message", timeout=5)
    assert reply["stopped"] is True
    assert reply["msg"] and len(reply["msg"]) < len("echo: one two three four five six seven")
    stored = (await any_stack.history(token))["messages"][-1]
    assert stored["stopped"] is True and stored["msg"] == reply["msg"]


async def test_stop_before_generation_starts_stops_the_queued_message(
    stack: Stack, model_server: ModelServer
) -> None:
    await stack.stop_workers()
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send("never mind")
        await chat.until("ack")
        await chat.send('{"type": "stop"}')
        await asyncio.sleep(0.05)
        stack.add_worker()
        reply = await chat.until("message")
    assert reply["stopped"] is True and reply["msg"] == ""
    assert model_server.requests == []


async def test_messages_wait_for_a_worker_and_the_sender_is_told(stack: Stack) -> None:
    await stack.stop_workers()
    token = await stack.new_session()
    async with stack.socket(token) as chat, stack.socket(token) as other_tab:
        await chat.send("is anybody there?")
        ack = await chat.next_event()
        notice = await chat.next_event()
        assert await chat.silence(0.3) == []
        stack.add_worker()
        reply = await chat.until("message")
        await other_tab.until("message")
    assert ack["type"] == "ack"
    assert notice == {
        "type": "notice",
        "code": "queued",
        "reply_to": ack["id"],
        "detail": "No worker is running right now; your message is queued and will be answered "
        "when one starts.",
    }
    assert reply["msg"] == "echo: is anybody there?"
    # Only the socket that sent the message is told.
    assert [e["type"] for e in other_tab.events if e["type"] != "token"] == ["ack", "message"]


async def test_no_notice_while_a_worker_is_alive(
    redis_url: str, model_server: ModelServer, redis: Redis
) -> None:
    # A long lease, so a heartbeat delayed by a busy machine does not count as a dead worker.
    settings = make_settings(
        redis_url, openai_base_url=model_server.openai_base_url, worker_lease_seconds=15
    )
    async with running_stack(settings) as stack:
        async with asyncio.timeout(30):
            while not await redis.zcard(f"{settings.key_prefix}:workers:alive"):
                await asyncio.sleep(0.02)
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            await chat.send("hi")
            await chat.until("message")
    assert "notice" not in [e["type"] for e in chat.events]
