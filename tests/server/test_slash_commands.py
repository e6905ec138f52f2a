"""Slash commands on the socket, against the real stack: answered to the sender with a
`command` event, never stored as chat messages, never sent to a worker."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from server.frames import HELP
from tests.conftest import make_settings
from tests.support.model_servers import ModelServer
from tests.support.stack import Stack, running_stack


async def assert_nothing_stored(stack: Stack, redis: Redis, token: str) -> None:
    assert (await stack.history(token))["messages"] == []
    assert await redis.xlen(stack.keys.requests_for(token)) == 0


@pytest.mark.parametrize("frame", ["/help", '{"type": "message", "msg": "/help"}', "/help\r\n"])
async def test_help_lists_the_commands(stack: Stack, redis: Redis, frame: str) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat, stack.socket(token) as other_tab:
        await chat.send(frame)
        answer = await chat.next_event()
        assert await other_tab.silence(0.3) == []  # the sender's alone
    assert answer == {"type": "command", "command": "help", "detail": HELP}
    for name in ("/help", "/reset", "/stop", "/title", "//"):
        assert name in answer["detail"]
    await assert_nothing_stored(stack, redis, token)


async def test_a_command_echoes_the_client_id(stack: Stack) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send('{"type": "message", "msg": "/help", "client_id": "b-1"}')
        answer = await chat.next_event()
    assert answer["client_id"] == "b-1"


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ("/dance", "Unknown command '/dance'; send /help"),
        ("/title   ", "/title needs a title"),
        ("/title " + "t" * 201, "the limit is 200"),
        ("/stop now", "/stop takes no argument"),
    ],
)
async def test_a_bad_command_is_a_bad_request(
    stack: Stack, redis: Redis, frame: str, words: str
) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send(frame)
        error = await chat.next_event()
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert words in error["detail"]
    await assert_nothing_stored(stack, redis, token)


async def test_double_slash_sends_the_literal_text(stack: Stack) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send("//help")
        ack = await chat.until("ack")
        reply = await chat.until("message")
    assert ack["msg"] == "/help"
    assert reply["msg"] == "echo: /help"
    assert [m["msg"] for m in (await stack.history(token))["messages"]] == ["/help", "echo: /help"]


@pytest.mark.parametrize("text", ["a/b", " /help", "1/2 cup"])
async def test_a_slash_not_first_is_text(stack: Stack, text: str) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send(text)
        ack = await chat.until("ack")
    assert ack["msg"] == text.strip()


async def test_stop_command_stops_the_reply(stack: Stack, model_server: ModelServer) -> None:
    model_server.behaviour.token_delay = 0.2
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send("one two three four five six seven eight nine ten")
        await chat.until("token")
        await chat.send("/stop")
        answer = await chat.until("command")
        reply = await chat.until("message", timeout=5)
    assert answer["command"] == "stop"
    assert reply["stopped"] is True
    messages = (await stack.history(token))["messages"]
    assert [m["source"] for m in messages] == ["human", "bot"]  # "/stop" is not among them


async def test_stop_command_shares_the_stop_rate_limit(redis_url: str) -> None:
    settings = make_settings(redis_url, rate_limit_stop_requests=2)
    async with running_stack(settings, workers=0) as stack:
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            await chat.send('{"type": "stop"}')
            await chat.send("/stop")
            await chat.send("/stop")
            answer = await chat.until("command")
            limited = await chat.until("error")
    assert answer["command"] == "stop"
    assert limited["code"] == "rate_limited" and limited["retry_after"] >= 1


async def test_reset_empties_the_history_and_tells_every_socket(stack: Stack) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat, stack.socket(token) as other_tab:
        await chat.send("remember this")
        await chat.until("message")
        await chat.send("/reset")
        answer = await chat.until("command")
        heard = await other_tab.until("conversation")
        await chat.send("and now?")
        reply = await chat.until("message")
    assert answer == {"type": "command", "command": "reset", "detail": "History cleared"}
    assert heard == {"type": "conversation", "change": "reset"}
    messages = (await stack.history(token))["messages"]
    assert [m["msg"] for m in messages] == ["and now?", "echo: and now?"]
    assert reply["msg"] == "echo: and now?"


async def test_reset_forgets_the_history_in_the_next_prompt(
    stack: Stack, model_server: ModelServer
) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send("old")
        await chat.until("message")
        await chat.send("/reset")
        await chat.until("command")
        await chat.send("new")
        await chat.until("message")
    last = model_server.requests[-1]["messages"]
    assert [t["content"] for t in last if t["role"] != "system"] == ["new"]


async def test_title_renames_the_conversation(stack: Stack, redis: Redis) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat, stack.socket(token) as other_tab:
        await chat.send("/title   Trip to Rome ")
        answer = await chat.until("command")
        heard = await other_tab.until("conversation")
    assert answer["command"] == "title" and answer["title"] == "Trip to Rome"
    assert heard == {"type": "conversation", "change": "title", "title": "Trip to Rome"}
    session = await stack.history(token)
    assert session["title"] == "Trip to Rome"
    assert session["messages"] == []
    assert await redis.xlen(stack.keys.requests_for(token)) == 0


async def test_a_title_set_by_command_is_kept_over_the_first_message(stack: Stack) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send("/title Mine")
        await chat.until("command")
        await chat.send("a first message")
        await chat.until("message")
    assert (await stack.history(token))["title"] == "Mine"


async def test_a_command_on_an_expired_session_closes_the_socket(
    stack: Stack, redis: Redis
) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await redis.delete(stack.keys.session(token))
        await chat.send("/title gone")
        error = await chat.until("error")
        await chat.ws.wait_closed()
    assert error["code"] == "session_expired"
    assert chat.ws.close_code == 1008
