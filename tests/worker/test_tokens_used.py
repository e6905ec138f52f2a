"""`tokens_used` in the final `message` event and the stored reply, through the whole stack
(socket, Redis, worker, the OpenAI-compatible fake server that reports usage)."""

from __future__ import annotations

from core.config import Settings
from tests.support.model_servers import HttpError, ModelServer, split_pieces
from tests.support.stack import Stack
from worker.backends.base import TURN_TOKENS, estimate_tokens


async def test_the_providers_count_is_sent_and_stored(stack: Stack) -> None:
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send("hello there")
        reply = await chat.until("message")
    system_words = len(stack.settings.system_prompt.split())
    expected = system_words + 2 + len(split_pieces("echo: hello there"))
    assert reply["tokens_used"] == expected
    stored = (await stack.history(token))["messages"][-1]
    assert stored["tokens_used"] == expected


async def test_a_stopped_reply_is_counted_here(
    stack: Stack, stack_settings: Settings, model_server: ModelServer
) -> None:
    """Stopped, the stream ends before the provider's usage chunk: the prompt is the
    backend's estimate and the partial reply is counted."""
    model_server.behaviour.token_delay = 0.2
    token = await stack.new_session()
    text = "one two three four five six seven eight nine ten"
    async with stack.socket(token) as chat:
        await chat.send(text)
        await chat.until("token")
        await chat.send('{"type": "stop"}')
        reply = await chat.until("message", timeout=5)
    assert reply["stopped"] is True
    turns = (stack_settings.system_prompt, text)
    prompt = sum(estimate_tokens(turn) + TURN_TOKENS for turn in turns)
    assert reply["tokens_used"] == prompt + estimate_tokens(reply["msg"])


async def test_an_error_reply_has_no_tokens_used(stack: Stack, model_server: ModelServer) -> None:
    model_server.behaviour.script.append(HttpError(400, "bad"))
    token = await stack.new_session()
    async with stack.socket(token) as chat:
        await chat.send("hi")
        await chat.until("error")
    assert "tokens_used" not in (await stack.history(token))["messages"][-1]
