"""The socket's query options against the real stack: `?history=1` and `?format=text`."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from tests.support.model_servers import HttpError, ModelServer
from tests.support.stack import Stack


async def test_history_comes_first_with_the_session_document(stack: Stack) -> None:
    token = await stack.new_session("Hana")
    async with stack.socket(token) as chat:
        await chat.send("first")
        await chat.until("message")
    async with stack.socket(token, "&history=1") as chat:
        history = await chat.next_event()
        await chat.send("second")
        reply = await chat.until("message")
    assert history["type"] == "history"
    session = history["session"]
    assert (session["token"], session["name"]) == (token, "Hana")
    assert [m["msg"] for m in session["messages"]] == ["first", "echo: first"]
    assert reply["msg"] == "echo: second"


async def test_without_history_nothing_comes_before_the_first_event(stack: Stack) -> None:
    token = await stack.new_session()
    async with stack.socket(token, "&history=0") as chat:
        assert await chat.silence(0.3) == []


async def test_history_misses_nothing_of_a_reply_being_generated(
    stack: Stack, model_server: ModelServer
) -> None:
    """A socket that opens mid-reply gets the document (the question, no reply yet), then the
    rest of the reply's events: its final `message` arrives after the history."""
    model_server.behaviour.token_delay = 0.1
    token = await stack.new_session()
    async with stack.socket(token) as first:
        await first.send("one two three four five")
        await first.until("token")
        async with stack.socket(token, "&history=1") as late:
            history = await late.next_event()
            reply = await late.until("message")
    assert history["type"] == "history"
    assert [m["source"] for m in history["session"]["messages"]] == ["human"]
    assert reply["msg"] == "echo: one two three four five"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("&format=xml", "format must be json or text, not 'xml'"),
        ("&format=plain", "format must be json or text, not 'plain'"),
        ("&history=yes", "history must be 1 or 0"),
    ],
)
async def test_a_bad_option_refuses_the_handshake_with_its_reason(
    stack: Stack, query: str, words: str
) -> None:
    token = await stack.new_session()
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{stack.server.ws_url}/chat?token={token}{query}"):
            pass
    response = refused.value.response
    assert response.status_code == 400
    assert words in json.loads(response.body)["detail"]


# --- ?format=text, from a plain client (the websockets library, no JSON parsing) ---------------


async def frames(ws: ClientConnection, seconds: float) -> list[str]:
    """Every frame that arrives within `seconds`."""
    got: list[str] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                frame = await ws.recv()
                assert isinstance(frame, str)
                got.append(frame)
    except TimeoutError:
        return got


async def text_frame(ws: ClientConnection) -> str:
    frame = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(frame, str), "a text socket sends text frames"
    return frame


async def text_socket(stack: Stack, token: str, extra: str = "") -> ClientConnection:
    return await websockets.connect(f"{stack.server.ws_url}/chat?token={token}&format=text{extra}")


async def test_text_format_sends_only_the_reply_text(stack: Stack) -> None:
    token = await stack.new_session()
    async with await text_socket(stack, token) as ws:
        await ws.send("hello there")
        reply = await text_frame(ws)
        await ws.send('{"type": "message", "msg": "and you?"}')
        second = await text_frame(ws)
        rest = await frames(ws, 0.5)
    assert (reply, second, rest) == ("echo: hello there", "echo: and you?", [])
    # Stored as usual.
    messages = (await stack.history(token))["messages"]
    assert [m["msg"] for m in messages] == [
        "hello there",
        "echo: hello there",
        "and you?",
        "echo: and you?",
    ]


async def test_text_format_sends_errors_as_text(stack: Stack) -> None:
    token = await stack.new_session()
    async with await text_socket(stack, token) as ws:
        await ws.send("x" * 4001)
        too_large = await text_frame(ws)
        await ws.send("   ")
        empty = await text_frame(ws)
    assert too_large == "error: too_large: Message is 4001 characters long; the limit is 4000"
    assert empty == "error: bad_request: Message is empty"


async def test_text_format_sends_a_model_error_as_text(
    stack: Stack, model_server: ModelServer
) -> None:
    model_server.behaviour.script.append(HttpError(400, "no such model"))
    token = await stack.new_session()
    async with await text_socket(stack, token) as ws:
        await ws.send("hi")
        error = await text_frame(ws)
    assert error == (
        "error: model_error: The model provider refused the request (HTTP 400): no such model"
    )


async def test_text_format_marks_a_stopped_reply(stack: Stack, model_server: ModelServer) -> None:
    model_server.behaviour.token_delay = 0.2
    token = await stack.new_session()
    async with stack.socket(token) as watcher, await text_socket(stack, token) as ws:
        await ws.send("one two three four five six seven eight nine ten")
        await watcher.until("token")
        await ws.send('{"type": "stop"}')
        stopped = await text_frame(ws)
    assert stopped.endswith(" [stopped]") and stopped.startswith("echo:")


async def test_text_format_with_history_sends_the_transcript(stack: Stack) -> None:
    token = await stack.new_session()
    async with await text_socket(stack, token, "&history=1") as ws:
        empty = await text_frame(ws)
        await ws.send("ping")
        await text_frame(ws)
    async with await text_socket(stack, token, "&history=1") as ws:
        transcript = await text_frame(ws)
    assert empty == "(no messages yet)"
    assert transcript == "Human: ping\nBot: echo: ping"
