"""Chat completions from any OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, the
Hugging Face router), over one shared `aiohttp.ClientSession` (HTTP keep-alive), with the
server-sent events parsed here.

Not the official `openai` client: its per-request work (building the request through its
option models, its connection-pool bookkeeping, a pydantic object per streamed chunk) was
about 45% of the worker's CPU with a fast model (docs/benchmarks.md, issue 12). Not `httpx`
either: on the same streamed request to a local server, httpx took 1.37 CPU ms and aiohttp
(its HTTP parser is in C) 0.18 ms, at 50 requests in flight (docs/benchmarks.md, goal 2).
The request is a plain JSON POST and each event is one `json.loads`; the reply ends at
`data: [DONE]` (the body is still read to its end, so the connection goes back to the pool).

Like httpx, it honours HTTP(S)_PROXY and NO_PROXY (`env_proxy`, read once at start: aiohttp's
own `trust_env` reads them, and ~/.netrc, in a thread on every request) and verifies TLS
against certifi's certificates.

Retries are the worker's (`stream_with_retries`): a 503 "model is loading" waits for the
`estimated_time` it names and every retry stays inside MODEL_TIMEOUT_SECONDS. Errors map as
the SDK's did: an HTTP error status through `http_failure`, a refused, broken or timed-out
connection and a malformed event to a retry (`TransientModelError`), an error event in the
stream to a `ModelError`.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import certifi

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
from worker.prompt import chat_turns

logger = logging.getLogger(__name__)

# Connections to the model server: a remote API serves hundreds of generations at once per
# worker (ModelBackend.default_concurrency), each on its own kept-alive connection. The
# worker's slots (WORKER_CONCURRENCY) bound how many are open, so the pool itself does not
# (aiohttp's default of 100 would queue the rest); idle ones close after KEEPALIVE_SECONDS.
KEEPALIVE_SECONDS = 30.0


class ChatCompletionsBackend(ModelBackend):
    def __init__(
        self, settings: Settings, *, base_url: str, api_key: str | None, model: str
    ) -> None:
        self._settings = settings
        self._model = model
        self.size_prompt(settings, settings.model_context_tokens)
        self._what = f"the model server at {base_url}"
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {
            # Local servers (vLLM, llama.cpp, Ollama) take any key.
            "Authorization": f"Bearer {api_key or 'not-needed'}",
            "Accept": "text/event-stream",
        }
        self._session: aiohttp.ClientSession | None = None
        self._proxy = env_proxy(self._url)
        if self._proxy:
            logger.info("Model requests go through the proxy %s", urlsplit(self._proxy).netloc)

    async def start(self) -> None:
        self._open()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on the event loop that uses it (at `start`, or the first request
        of a backend that was not started)."""
        if self._session is None:
            seconds = self._settings.model_timeout_seconds
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                # As httpx's timeout was: each connect and each read may take this long; the
                # whole reply is bounded by the worker (MODEL_TIMEOUT_SECONDS per attempt).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds),
                connector=aiohttp.TCPConnector(
                    limit=0,
                    keepalive_timeout=KEEPALIVE_SECONDS,
                    ssl=ssl.create_default_context(cafile=certifi.where()),
                ),
            )
        return self._session

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
        """One request. The server's own token counts come in a last chunk (with no
        choices), which `include_usage` asks for; a server that sends none leaves the
        worker's count."""
        async for chunk in self._chunks(turns):
            if isinstance(counts := chunk.get("usage"), dict):
                usage.prompt = _count(counts.get("prompt_tokens"), usage.prompt)
                usage.completion = _count(counts.get("completion_tokens"), usage.completion)
            choices = chunk.get("choices")
            if choices:
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    yield content

    async def _chunks(self, turns: list[Any]) -> AsyncIterator[dict[str, Any]]:
        """The streamed completion's chunks, decoded (the last one may carry only `usage`)."""
        body = {
            "model": self._model,
            "messages": turns,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": self._settings.model_max_new_tokens,
            "temperature": self._settings.model_temperature,
        }
        try:
            async with self._open().post(self._url, json=body, proxy=self._proxy) as response:
                if response.status >= 400:
                    raise http_failure(response.status, await _body(response), response.headers)
                done = False
                async for data in sse_data(response.content.iter_any()):
                    # Read on after [DONE] to the body's end, as the SDK does: a response
                    # closed unread takes its connection with it (no keep-alive).
                    done = done or data == b"[DONE]"
                    if not done:
                        yield _chunk(data)
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError is one too
            raise TransientModelError("Request timed out.") from exc
        except aiohttp.ClientError as exc:  # refused, reset, cut mid-stream, bad HTTP
            raise TransientModelError(f"Connection error: {exc or type(exc).__name__}") from exc


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY / HTTP_PROXY by its scheme, none
    when NO_PROXY covers its host), as curl, requests and httpx read them."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


async def sse_data(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event in `stream` (multi-line data joined by newlines,
    per the SSE format); comments, other fields and events without data are skipped."""
    pending = b""
    data: list[bytes] = []
    async for block in stream:
        pending += block
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if data:
                    yield b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
    if pending.startswith(b"data:"):  # a last event the server did not end with a blank line
        value = pending[5:].rstrip(b"\r")
        data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield b"\n".join(data)


def _chunk(data: bytes) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise TransientModelError(f"Malformed event from the model server: {data[:200]!r}") from exc
    if not isinstance(chunk, dict):
        raise TransientModelError(f"Malformed event from the model server: {data[:200]!r}")
    if "error" in chunk:  # an error reported inside the stream, after a 200
        raise ModelError(f"The model server reported an error: {_detail(chunk['error'])}")
    return chunk


def _count(value: object, otherwise: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else otherwise


def _detail(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


async def _body(response: aiohttp.ClientResponse) -> object:
    """The whole error body: a loading model's `estimated_time` sits beside its "error"."""
    raw = await response.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
