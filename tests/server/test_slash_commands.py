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
    assert await redis.xlen(f"{stack.settings.key_prefix}:requests") == 0


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
