"""Chat completions from any OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, the
Hugging Face router), through the official `openai` client.

The client's own retries are off: the worker retries here, so a 503 "model is loading" waits
for the `estimated_time` it names and every retry stays inside MODEL_TIMEOUT_SECONDS.

The request goes through the client's generic `post` (its documented way to call any
endpoint) with a plain JSON body rather than `chat.completions.create`: `create` first walks
its forty typed parameters and every message through the SDK's TypedDict transform, which
profiling showed to be the worker's largest single CPU cost per message (see
docs/benchmarks.md). Auth, errors, SSE parsing and the typed chunks are the client's own.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from core.config import Settings
from core.models import Message
from worker.backends.base import (
    ModelBackend,
    TransientModelError,
    Usage,
    http_failure,
    stream_with_retries,
)
from worker.prompt import chat_turns

logger = logging.getLogger(__name__)


class ChatCompletionsBackend(ModelBackend):
    def __init__(
        self, settings: Settings, *, base_url: str, api_key: str | None, model: str
    ) -> None:
        self._settings = settings
        self._model = model
        self.size_prompt(settings, settings.model_context_tokens)
        self._what = f"the model server at {base_url}"
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            # Local servers (vLLM, llama.cpp, Ollama) take any key; the client wants one.
            api_key=api_key or "not-needed",
            max_retries=0,
            timeout=settings.model_timeout_seconds,
        )

    async def aclose(self) -> None:
        await self._client.close()

    def stream_reply(
        self, history: Sequence[Message], usage: Usage | None = None
    ) -> AsyncIterator[str]:
        history = self.fit(history)
        usage = usage if usage is not None else Usage()
        usage.prompt = self.prompt_tokens(history)
        turns = chat_turns(history, self._settings.system_prompt)
        return stream_with_retries(
            lambda: self._attempt(turns, usage), self._settings.model_max_retries, self._what
        )

    async def _attempt(self, turns: list[Any], usage: Usage) -> AsyncIterator[str]:
        """One request. The server's own token counts come in a last chunk, which
        `include_usage` asks for (every OpenAI-compatible server we target sends it)."""
        try:
            stream = await self._client.post(
                "/chat/completions",
                body={
                    "model": self._model,
                    "messages": turns,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "max_tokens": self._settings.model_max_new_tokens,
                    "temperature": self._settings.model_temperature,
                },
                options={"security": {"bearer_auth": True}},
                cast_to=ChatCompletion,
                stream=True,
                stream_cls=openai.AsyncStream[ChatCompletionChunk],
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage.prompt = chunk.usage.prompt_tokens
                        usage.completion = chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except openai.APIStatusError as exc:
            raise http_failure(exc.status_code, _body(exc), exc.response.headers) from exc
        except (openai.APIConnectionError, openai.APIResponseValidationError) as exc:
            raise TransientModelError(str(exc) or type(exc).__name__) from exc


def _body(exc: openai.APIStatusError) -> object:
    """The whole error body: the client keeps only its "error" field in `exc.body`, and a
    loading model's `estimated_time` sits beside that field."""
    try:
        return exc.response.json()
    except (ValueError, RuntimeError):
        return exc.body if exc.body is not None else exc.message
