"""The remote model backends over real HTTP, against the local model server.

Three forms are covered: the OpenAI-compatible backend (MODEL_BACKEND=openai), the Hugging Face
chat form (HF_API=chat, the same client against the HF address) and the Hugging Face
text-generation form (HF_API=text-generation, `huggingface_hub` against a TGI model URL).
Faults are scripted on the server; nothing in the client libraries is mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import pytest

from core.config import Settings
from core.models import ErrorCode, Message, Source
from tests.conftest import make_settings
from tests.support.model_servers import (
    CutStream,
    Fault,
    Hang,
    HttpError,
    Loading,
    ModelServer,
    RateLimited,
    split_pieces,
)
from worker.backends import ModelBackend, ModelError, ModelUnavailable, create_backend
from worker.backends.base import (
    TURN_TOKENS,
    TransientModelError,
    Usage,
    estimate_tokens,
    http_failure,
)
from worker.prompt import CUT_MARK

# Backend tests never touch Redis; Settings only needs some URL.
NO_REDIS = "redis://127.0.0.1:1/0"

Kind = Literal["openai", "hf-chat", "hf-text"]
BackendFactory = Callable[..., Awaitable[ModelBackend]]

PROMPT = "Human: hi\nBot: hello\nHuman: how are you?\nBot:"
ECHO = "echo: how are you?"


@pytest.fixture
def history() -> list[Message]:
    hi = Message(source=Source.HUMAN, msg="hi")
    return [
        hi,
        Message(source=Source.BOT, msg="hello", reply_to=hi.id),
        Message(source=Source.HUMAN, msg="how are you?"),
    ]


def backend_settings(kind: Kind, root_url: str, **overrides: Any) -> Settings:
    """Settings for one backend form, talking to the server at `root_url`."""
    values: dict[str, Any]
    if kind == "openai":
        values = {
            "model_backend": "openai",
            "openai_base_url": f"{root_url}/v1",
            "openai_model": "m",
            "openai_api_key": "sk-test",
        }
    elif kind == "hf-chat":
        values = {
            "model_backend": "huggingface",
            "hf_api": "chat",
            "model_url": f"{root_url}/v1",
            "hf_token": "hf_test",
            "hf_model": "org/name",
        }
    else:
        values = {
            "model_backend": "huggingface",
            "hf_api": "text-generation",
            "model_url": f"{root_url}/models/org/name",
            "hf_token": "hf_test",
        }
    values.update(overrides)
    return make_settings(NO_REDIS, **values)


async def collect(backend: ModelBackend, history: Sequence[Message]) -> list[str]:
    """The reply's pieces, in order."""
    return [piece async for piece in backend.stream_reply(history)]


@pytest.fixture
async def make_backend(model_server: ModelServer) -> AsyncIterator[BackendFactory]:
    """Builds and starts backends (against `model_server` unless told another root URL);
    closes every one of them at the end of the test."""
    made: list[ModelBackend] = []

    async def make(kind: Kind, *, root_url: str | None = None, **overrides: Any) -> ModelBackend:
        settings = backend_settings(kind, root_url or model_server.url, **overrides)
        backend = create_backend(settings)
        made.append(backend)
        await backend.start()
        return backend

    yield make
    for backend in made:
        await backend.aclose()


@pytest.fixture
async def openai_backend(make_backend: BackendFactory) -> AsyncIterator[ModelBackend]:
    backend = await make_backend("openai")
    yield backend


@pytest.fixture
async def hf_chat_backend(make_backend: BackendFactory) -> AsyncIterator[ModelBackend]:
    backend = await make_backend("hf-chat")
    yield backend


@pytest.fixture
async def hf_text_backend(make_backend: BackendFactory) -> AsyncIterator[ModelBackend]:
    backend = await make_backend("hf-text")
    yield backend


# Both protocols: OpenAI chat completions and Hugging Face text generation.
both_protocols = pytest.mark.parametrize("kind", ["openai", "hf-text"])


def retry_waits(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The retry warnings logged by stream_with_retries."""
    return [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]


# --- Normal replies ---------------------------------------------------------------------------


async def test_openai_backend_streams_the_reply_with_chat_turns(
    model_server: ModelServer, openai_backend: ModelBackend, history: list[Message]
) -> None:
    pieces = await collect(openai_backend, history)

    assert pieces == split_pieces(ECHO)
    assert len(pieces) > 1
    [request] = model_server.received
    assert request.path == "/v1/chat/completions"
    assert request.bearer_token == "sk-test"
    body = request.body
    assert body["stream"] is True
    assert body["max_tokens"] == 24  # make_settings' model_max_new_tokens
    assert body["model"] == "m"
    assert body["messages"] == [
        {"role": "system", "content": "You are a helpful, concise assistant."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
    ]


async def test_hf_chat_form_streams_the_reply_and_sends_the_hf_token(
    model_server: ModelServer, hf_chat_backend: ModelBackend, history: list[Message]
) -> None:
    pieces = await collect(hf_chat_backend, history)

    assert pieces == split_pieces(ECHO)
    [request] = model_server.received
    assert request.path == "/v1/chat/completions"
    assert request.bearer_token == "hf_test"
    body = request.body
    assert body["stream"] is True
    assert body["max_tokens"] == 24
    assert body["model"] == "org/name"
    assert [turn["role"] for turn in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][-1]["content"] == "how are you?"


class ForwardProxy:
    """A plain HTTP forward proxy on loopback: it notes each request line it is sent (a proxied
    request names the whole URL) and relays the connection to the origin."""

    def __init__(self) -> None:
        self.request_lines: list[str] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.decode().split(" ")
        self.request_lines.append(f"{method} {target}")
        origin = urlsplit(target)
        up_reader, up_writer = await asyncio.open_connection(origin.hostname, origin.port)
        path = origin.path + (f"?{origin.query}" if origin.query else "")
        up_writer.write(f"{method} {path} {version}\r\n".encode() + rest)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while block := await src.read(65536):
                dst.write(block)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.mark.parametrize("bypassed", [False, True], ids=["proxied", "no-proxy"])
async def test_the_openai_backend_goes_through_the_proxy_the_environment_names(
    model_server: ModelServer,
    make_backend: BackendFactory,
    history: list[Message],
    monkeypatch: pytest.MonkeyPatch,
    bypassed: bool,
) -> None:
    """HTTP_PROXY is honoured as httpx and the SDK honoured it (the backend reads it once, at
    start), and NO_PROXY exempts a host."""
    async with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1" if bypassed else "example.invalid")
        backend = await make_backend("openai")

        assert "".join(await collect(backend, history)) == ECHO

    expected = [] if bypassed else [f"POST {model_server.url}/v1/chat/completions"]
    assert proxy.request_lines == expected
    assert len(model_server.received) == 1


async def test_hf_text_generation_sends_the_tagged_prompt_and_streams_the_echo(
    model_server: ModelServer, hf_text_backend: ModelBackend, history: list[Message]
) -> None:
    pieces = await collect(hf_text_backend, history)

    assert "".join(pieces) == ECHO
    assert len(pieces) > 1
    assert not any("</s>" in piece for piece in pieces)  # the special end token is dropped
    [request] = model_server.received
    assert request.path == "/models/org/name"
    assert request.bearer_token == "hf_test"
    body = request.body
    assert body["inputs"] == PROMPT
    assert body["stream"] is True
    parameters = body["parameters"]
    assert parameters["max_new_tokens"] == 24
    assert parameters["return_full_text"] is False
    assert parameters["stop"] == ["Human:"]
    assert parameters["details"] is True


@pytest.mark.parametrize(
    "ignore_stop", [True, False], ids=["client-cuts-reply", "server-honours-stop"]
)
async def test_hf_text_generation_reply_ends_before_the_next_human_line(
    model_server: ModelServer,
    hf_text_backend: ModelBackend,
    history: list[Message],
    ignore_stop: bool,
) -> None:
    model_server.behaviour.reply_override = "Sure.\nHuman: next question"
    model_server.behaviour.ignore_stop = ignore_stop

    pieces = await collect(hf_text_backend, history)

    reply = "".join(pieces)
    assert "Human:" not in reply
    assert "next question" not in reply
    assert reply.strip() == "Sure."
    assert len(model_server.requests) == 1


# --- Waits the server asks for -----------------------------------------------------------------


@both_protocols
@pytest.mark.parametrize(
    ("fault", "status"),
    [
        pytest.param(Loading(estimated_time=0.3), 503, id="503-loading-estimated-time"),
        # Retry-After is sent verbatim ("0.3"), to keep the test short.
        pytest.param(RateLimited(retry_after="0.3"), 429, id="429-retry-after"),
    ],
)
async def test_waits_as_long_as_the_server_asks_then_answers(
    model_server: ModelServer,
    make_backend: BackendFactory,
    history: list[Message],
    caplog: pytest.LogCaptureFixture,
    kind: Kind,
    fault: Fault,
    status: int,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.backends.base")
    model_server.behaviour.script = [fault]
    backend = await make_backend(kind)

    started = time.monotonic()
    pieces = await collect(backend, history)
    elapsed = time.monotonic() - started

    assert "".join(pieces) == ECHO
    assert len(model_server.requests) == 2
    assert elapsed >= 0.25
    # The wait is the one the server asked for, not the default backoff (0.5 s).
    [warning] = retry_waits(caplog)
    assert f"HTTP {status}" in warning
    assert "in 0.3s" in warning


# --- Final failures -----------------------------------------------------------------------------


@both_protocols
async def test_rejected_credentials_401_fail_at_once(
    model_server: ModelServer, make_backend: BackendFactory, history: list[Message], kind: Kind
) -> None:
    model_server.behaviour.require_token = "right"
    backend = await make_backend(kind, openai_api_key="wrong", hf_token="hf_wrong")

    with pytest.raises(ModelError) as caught:
        await collect(backend, history)

    assert caught.value.code is ErrorCode.MODEL_ERROR
    assert "credentials" in caught.value.detail
    assert "HTTP 401" in caught.value.detail
    assert len(model_server.requests) == 1


@both_protocols
async def test_persistent_500_is_retried_then_unavailable(
    model_server: ModelServer, make_backend: BackendFactory, history: list[Message], kind: Kind
) -> None:
    model_server.behaviour.script = [HttpError(500, "boom")] * 10
    backend = await make_backend(kind, model_max_retries=2)

    with pytest.raises(ModelUnavailable) as caught:
        await collect(backend, history)

    assert caught.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert "HTTP 500" in caught.value.detail
    assert "boom" in caught.value.detail
    assert len(model_server.requests) == 3


@both_protocols
async def test_bad_request_400_fails_without_retry(
    model_server: ModelServer, make_backend: BackendFactory, history: list[Message], kind: Kind
) -> None:
    model_server.behaviour.script = [HttpError(400, "bad input")]
    backend = await make_backend(kind)

    with pytest.raises(ModelError) as caught:
        await collect(backend, history)

    assert "HTTP 400" in caught.value.detail
    assert "bad input" in caught.value.detail
    assert len(model_server.requests) == 1


async def test_tgi_overloaded_error_is_retried(
    model_server: ModelServer, make_backend: BackendFactory, history: list[Message]
) -> None:
    # A TGI error body with an `error_type` makes huggingface_hub raise its own TGI error
    # classes (here OverloadedError) instead of HfHubHTTPError.
    model_server.behaviour.script = [HttpError(429, "Model is overloaded", "overloaded")]
    backend = await make_backend("hf-text")

    pieces = await collect(backend, history)

    assert "".join(pieces) == ECHO
    assert len(model_server.requests) == 2


async def test_tgi_validation_error_fails_without_retry(
    model_server: ModelServer, make_backend: BackendFactory, history: list[Message]
) -> None:
    model_server.behaviour.script = [HttpError(422, "Input validation error", "validation")]
    backend = await make_backend("hf-text")

    with pytest.raises(ModelError) as caught:
        await collect(backend, history)

    assert "HTTP 422" in caught.value.detail
    assert "Input validation error" in caught.value.detail
    assert len(model_server.requests) == 1


# --- Broken connections -------------------------------------------------------------------------


@both_protocols
async def test_stream_cut_after_text_fails_without_retry(
    model_server: ModelServer, make_backend: BackendFactory, history: list[Message], kind: Kind
) -> None:
    model_server.behaviour.script = [CutStream(after_pieces=2)]
    backend = await make_backend(kind)
    pieces: list[str] = []

    with pytest.raises(ModelError) as caught:
        async for piece in backend.stream_reply(history):
            pieces.append(piece)

    assert "".join(pieces) == "".join(split_pieces(ECHO)[:2])
    assert "broke off" in caught.value.detail
    assert len(model_server.requests) == 1


@both_protocols
async def test_stream_cut_before_any_text_is_retried(
    model_server: ModelServer, make_backend: BackendFactory, history: list[Message], kind: Kind
) -> None:
    model_server.behaviour.script = [CutStream(after_pieces=0)]
    backend = await make_backend(kind)

    pieces = await collect(backend, history)

    assert "".join(pieces) == ECHO
    assert len(model_server.requests) == 2


def closed_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@both_protocols
async def test_connection_refused_is_retried_then_unavailable(
    make_backend: BackendFactory, history: list[Message], kind: Kind
) -> None:
    backend = await make_backend(
        kind, root_url=f"http://127.0.0.1:{closed_port()}", model_max_retries=1
    )

    with pytest.raises(ModelUnavailable) as caught:
        await collect(backend, history)

    assert caught.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert "unavailable" in caught.value.detail


@both_protocols
async def test_hanging_server_times_out_in_the_backend(
    model_server: ModelServer, make_backend: BackendFactory, history: list[Message], kind: Kind
) -> None:
    model_server.behaviour.script = [Hang(5)]
    backend = await make_backend(kind, model_timeout_seconds=0.5, model_max_retries=0)

    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as caught:
        await collect(backend, history)
    elapsed = time.monotonic() - started

    assert elapsed < 4
    assert "timed out" in caught.value.detail.lower()
    assert len(model_server.requests) == 1


# --- http_failure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "final", "wait", "words"),
    [
        (401, {"error": "Invalid credentials"}, None, ModelError, None, ["credentials", "401"]),
        (403, {"error": {"message": "no access"}}, {}, ModelError, None, ["credentials", "403"]),
        (400, {"error": {"message": "bad input"}}, {}, ModelError, None, ["400", "bad input"]),
        (404, "Not Found", {}, ModelError, None, ["404", "Not Found"]),
        (429, {"error": "Rate limit reached"}, {"retry-after": "7"}, None, 7.0, ["429"]),
        (500, {"error": {"message": "boom"}}, {}, None, None, ["500", "boom"]),
        (503, {"error": "loading", "estimated_time": 12.5}, {}, None, 12.5, ["503", "loading"]),
        (503, {"error": "loading", "estimated_time": 900}, {}, None, 60.0, ["503"]),
    ],
    ids=["401", "403", "400", "404", "429-retry-after", "500", "503-loading", "503-capped"],
)
def test_http_failure_maps_status_to_retry_or_final_failure(
    status: int,
    body: object,
    headers: Mapping[str, str] | None,
    final: type[ModelError] | None,
    wait: float | None,
    words: list[str],
) -> None:
    failure = http_failure(status, body, headers)

    if final is not None:
        assert type(failure) is final
        detail = failure.detail if isinstance(failure, ModelError) else ""
    else:
        assert isinstance(failure, TransientModelError)
        assert failure.wait == wait
        detail = failure.detail
    for word in words:
        assert word in detail


async def test_a_tutorial_model_url_is_asked_in_the_text_generation_form(
    model_server: ModelServer, history: list[Message]
) -> None:
    """MODEL_URL=.../models/<id> with HF_API left at its default: the tutorial's form, posted
    to the model's address, not to `.../models/<id>/chat/completions`."""
    settings = make_settings(
        NO_REDIS, model_backend="huggingface", model_url=model_server.hf_model_url
    )
    backend = create_backend(settings)
    await backend.start()
    try:
        reply = "".join(await collect(backend, history))
    finally:
        await backend.aclose()
    assert reply.strip() == ECHO
    assert [r.path for r in model_server.received] == [f"/models/{model_server.model_id}"]
    assert model_server.requests[0]["inputs"] == PROMPT


# --- The prompt fits the context, and the tokens used are reported -----------------------------


@pytest.mark.parametrize("kind", ["openai", "hf-chat", "hf-text"])
async def test_the_provider_reports_the_tokens_used(
    make_backend: BackendFactory, history: list[Message], kind: Kind
) -> None:
    """The fake servers count as the real protocols report: OpenAI's usage chunk (asked for
    with include_usage) and TGI's stream details."""
    backend = await make_backend(kind)
    usage = Usage()
    reply = "".join([p async for p in backend.stream_reply(history, usage)])
    pieces = len(split_pieces(reply.strip()))
    if kind == "hf-text":
        assert usage == Usage(prompt=len(PROMPT.split()), completion=pieces + 1)  # and </s>
    else:
        words = sum(len(m.msg.split()) for m in history)
        system = len(backend.system_prompt.split())
        assert usage == Usage(prompt=words + system, completion=pieces)


async def test_without_a_usage_report_the_prompt_is_counted(
    make_backend: BackendFactory, model_server: ModelServer, history: list[Message]
) -> None:
    backend = await make_backend("openai")
    usage = Usage()
    stream = cast(AsyncGenerator[str, None], backend.stream_reply(history, usage))
    first = await anext(stream)
    await stream.aclose()
    assert first
    assert usage.completion is None
    assert usage.prompt == backend.prompt_tokens(history) > 0
    assert model_server.requests[0]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("kind", ["openai", "hf-text"])
async def test_a_message_longer_than_the_context_is_cut_to_fit(
    make_backend: BackendFactory, model_server: ModelServer, kind: Kind
) -> None:
    """MODEL_CONTEXT_TOKENS=200 with 64 kept for the reply: an old exchange and a 3,000-byte
    message (1,000 estimated tokens) become the message's end alone, and it is answered."""
    old = Message(source=Source.HUMAN, msg="an old question")
    long_text = "word " * 590 + "so what is the answer?"
    history = [old, Message(source=Source.BOT, msg="old", reply_to=old.id)]
    history.append(Message(source=Source.HUMAN, msg=long_text))
    backend = await make_backend(kind, model_context_tokens=200, model_max_new_tokens=64)
    reply = "".join(await collect(backend, history))
    sent = model_server.requests[0]
    if kind == "openai":
        prompt = [turn["content"] for turn in sent["messages"] if turn["role"] != "system"]
        assert len(prompt) == 1
        text = prompt[0]
        size = sum(estimate_tokens(t["content"]) + TURN_TOKENS for t in sent["messages"])
    else:
        text = sent["inputs"].removeprefix("Human: ").removesuffix("\nBot:")
        size = estimate_tokens(sent["inputs"])
    assert text.startswith(CUT_MARK) and text.endswith("so what is the answer?")
    assert 136 - TURN_TOKENS < size <= 136
    assert "an old question" not in json.dumps(sent)
    assert reply.strip().endswith("so what is the answer?")
