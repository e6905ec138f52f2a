"""The tutorial's backend, brought up to date: the Hugging Face Inference API.

Two forms, chosen by HF_API:
- `chat` (default): the router's OpenAI-compatible chat completions (`/v1/chat/completions`),
  the form most hosted LLMs are served in today; the history goes as user/assistant turns.
- `text-generation`: the tutorial's form, `{"inputs": "Human: ...\\nBot:", "parameters": ...}`
  against a model URL (the router's hf-inference address, a dedicated Inference Endpoint or a
  TGI server), through `huggingface_hub.AsyncInferenceClient`. The reply is cut at the first
  "Human:" as it streams.

MODEL_URL overrides the address in both forms. A MODEL_URL that is a model's address
(`.../models/<id>`, the tutorial's) means the text-generation form when HF_API is unset, and is
refused at start with HF_API=chat (core/config.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Sequence

# Without this, huggingface_hub's first request makes a blocking look-up on the Hub from the
# event loop thread (user-agent "agent detection"); we talk to the configured URL only.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Without HF_TOKEN, send no token at all: never a login cached on this machine, which would go
# to whatever MODEL_URL names.
os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, TextGenerationError

from core.config import Settings
from core.models import Message
from worker.backends.base import (
    ModelBackend,
    ModelError,
    TransientModelError,
    Usage,
    http_failure,
    stream_with_retries,
)
from worker.backends.openai_compat import ChatCompletionsBackend
from worker.prompt import HUMAN_TAG, StopSequenceFilter, build_prompt

logger = logging.getLogger(__name__)


def create_huggingface_backend(settings: Settings) -> ModelBackend:
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    if settings.hf_form == "chat":
        return ChatCompletionsBackend(
            settings, base_url=settings.hf_endpoint, api_key=token, model=settings.hf_model
        )
    return TextGenerationBackend(settings, url=settings.hf_endpoint, token=token)


class TextGenerationBackend(ModelBackend):
    def __init__(self, settings: Settings, *, url: str, token: str | None) -> None:
        self._settings = settings
        self._url = url
        self._token = token
        self._what = f"the model at {url}"
        self.size_prompt(settings, settings.model_context_tokens)

    def _client(self) -> AsyncInferenceClient:
        """A client for one request, closed when the reply ends.

        AsyncInferenceClient keeps every streaming response it opened (request body included)
        until it is closed, so one client for the worker's lifetime would grow without bound.
        A URL (never a bare model id) makes it talk to that address only, with no provider
        look-up on the Hub.
        """
        return AsyncInferenceClient(
            model=self._url, token=self._token, timeout=self._settings.model_timeout_seconds
        )

    def prompt_tokens(self, history: Sequence[Message]) -> int:
        """The tutorial's prompt is one text (no system prompt): its estimate."""
        return self.count_tokens(build_prompt(history))

    def stream_reply(
        self, history: Sequence[Message], usage: Usage | None = None
    ) -> AsyncIterator[str]:
        history = self.fit(history)
        usage = usage if usage is not None else Usage()
        usage.prompt = self.prompt_tokens(history)
        prompt = build_prompt(history)
        return stream_with_retries(
            lambda: self._attempt(prompt, usage), self._settings.model_max_retries, self._what
        )

    async def _attempt(self, prompt: str, usage: Usage) -> AsyncIterator[str]:
        try:
            async with self._client() as client:
                async for piece in self._pieces(client, prompt, usage):
                    yield piece
        except HfHubHTTPError as exc:
            raise _http_failure(exc) from exc
        except TextGenerationError as exc:
            # A TGI error body with an `error_type` ("overloaded", "validation", ...) comes as
            # one of these instead, with the HTTP error as its cause; without one it was an
            # error event in the stream.
            if isinstance(exc.__cause__, HfHubHTTPError):
                raise _http_failure(exc.__cause__) from exc
            raise ModelError(f"The model failed: {exc}") from exc
        except InferenceTimeoutError as exc:
            raise TransientModelError(f"timed out: {exc}") from exc
        except (httpx2.TransportError, OSError) as exc:
            raise TransientModelError(f"connection failed: {exc or type(exc).__name__}") from exc

    async def _pieces(
        self, client: AsyncInferenceClient, prompt: str, usage: Usage
    ) -> AsyncIterator[str]:
        """The reply's text, special tokens skipped, ending before any "Human:" line. The last
        event's `details` (asked for with `details=True`) carries TGI's token counts."""
        cut = StopSequenceFilter(HUMAN_TAG)
        stream = await client.text_generation(
            prompt,
            stream=True,
            details=True,
            max_new_tokens=self._settings.model_max_new_tokens,
            temperature=self._settings.model_temperature or None,
            do_sample=self._settings.model_temperature > 0,
            return_full_text=False,
            stop=[HUMAN_TAG],
        )
        async for output in stream:
            if output.details is not None:  # older TGI versions leave input_length out
                usage.prompt = output.details.input_length or usage.prompt
                usage.completion = output.details.generated_tokens
            if output.token.special:
                continue
            piece = cut.feed(output.token.text)
            if piece:
                yield piece
            if cut.stopped:
                return
        rest = cut.flush()
        if rest:
            yield rest


def _http_failure(exc: HfHubHTTPError) -> Exception:
    response = exc.response
    return http_failure(response.status_code, _body(exc), response.headers)


def _body(exc: HfHubHTTPError) -> object:
    try:
        return json.loads(exc.response.text)
    except (ValueError, RuntimeError):
        return exc.server_message or str(exc)
