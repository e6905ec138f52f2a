"""Local HTTP model servers for tests and benchmarks.

:class:`ModelServer` runs a small Starlette app under uvicorn, on ``127.0.0.1`` and a free port,
inside the *current* event loop. The app speaks two model-provider protocols over real HTTP, so
the official clients (``openai``, ``huggingface_hub``, plain ``httpx``) can be pointed at it
unchanged:

Hugging Face text generation (TGI form)
    ``POST /models/{org}/{name}`` (any model id, slashes allowed), and TGI's own routes
    ``POST /``, ``POST /generate`` and ``POST /generate_stream``. The body is
    ``{"inputs": str, "parameters": {...}, "stream": bool}``. Non-streaming answers are the
    legacy list ``[{"generated_text": ...}]`` (or the dict ``{"generated_text": ...,
    "details": null}`` when :attr:`ModelServerBehaviour.hf_dict_response` is set). Streaming
    answers (``"stream": true`` or the ``/generate_stream`` route) are server-sent events, one
    ``data: {json}`` per token, then one special ``</s>`` token whose event also carries the
    full ``generated_text`` (and, with ``details: true``, TGI's stream details: the
    ``generated_tokens``, the special one included, and ``input_length``, the prompt's words).
    ``parameters.stop`` is honoured (the reply is cut before the first stop string, unless
    :attr:`ModelServerBehaviour.ignore_stop` is set) and ``parameters.return_full_text: true``
    prefixes the prompt to ``generated_text``.
    ``max_new_tokens`` and the sampling parameters are only recorded.

OpenAI-compatible chat completions
    ``POST /v1/chat/completions`` and ``POST /chat/completions`` (so a ``base_url`` with or
    without ``/v1`` works), plus ``POST /models/{org}/{name}/v1/chat/completions`` (where
    ``huggingface_hub`` sends ``chat_completion`` for a model URL). Non-streaming answers are a
    ``chat.completion`` object; streaming answers are ``chat.completion.chunk`` events (a role
    chunk, one chunk per piece, a ``finish_reason: "stop"`` chunk, a usage chunk when
    ``stream_options.include_usage`` is set: ``prompt_tokens`` counts the messages' words,
    ``completion_tokens`` the reply's pieces) and then ``data: [DONE]``. ``GET /v1/models`` (and
    ``GET /models``) list the one model.

Replies are deterministic so tests can check routing and prompts: text generation answers
``f"echo: {last_human}"`` (see :func:`hf_echo_reply`), chat answers ``f"echo: {last user
message}"`` (see :func:`chat_echo_reply`), unless :attr:`ModelServerBehaviour.reply_override`
is set. Streamed replies come in word pieces (see :func:`split_pieces`).

Failures are scripted with :attr:`ModelServerBehaviour.script`, a queue of faults
(:class:`Loading`, :class:`RateLimited`, :class:`HttpError`, :class:`Hang`,
:class:`CutStream`) consumed one per generation request. Every generation request is recorded
(:attr:`ModelServer.requests`, :attr:`ModelServer.received`).

Example::

    async with ModelServer() as server:
        server.behaviour.script.append(Loading(estimated_time=3.0))
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        ...
        assert server.requests[-1]["messages"][-1]["content"] == "hi"

The module also runs as a standalone server for other processes::

    python -m tests.support.model_servers --port 8123 --token-delay 0.05

Notes on the clients (openai 3.54, huggingface_hub 2.4, as installed):

* Both clients use ``httpx2``, not ``httpx``: their transport errors (e.g. after a
  :class:`CutStream`) are ``httpx2.*`` classes, which ``except httpx.HTTPError`` does not catch.
* ``huggingface_hub`` fetches ``{HF_ENDPOINT}/api/agent-harnesses`` once per process, with a
  blocking call on the event loop, the first time it builds request headers (telemetry).
  Set ``HF_HUB_DISABLE_TELEMETRY=1`` before importing it to avoid this. ``HF_HUB_OFFLINE=1``
  also skips it but makes every request fail, the ones to this local server included.
* ``openai`` puts ``body["error"]`` in ``APIStatusError.body``, so for :class:`Loading` that
  is only the message; ``estimated_time`` is in ``exc.response.json()``. A cut stream raises
  ``openai.APIConnectionError``. ``huggingface_hub`` raises ``HfHubHTTPError`` (body and
  headers on ``exc.response``) and, for a cut stream, the raw ``httpx2.RemoteProtocolError``.
* ``huggingface_hub``'s ``text_generation(stream=True)`` yields the special ``</s>`` text too
  unless ``details=True`` (then ``token.special`` tells it apart).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import re
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeAlias, assert_never

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.support.asgi_server import InProcessServer

__all__ = [
    "CutStream",
    "Fault",
    "Hang",
    "HttpError",
    "Loading",
    "ModelServer",
    "ModelServerBehaviour",
    "RateLimited",
    "RecordedRequest",
    "apply_stop",
    "chat_echo_reply",
    "hf_echo_reply",
    "main",
    "split_pieces",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID: Final = "org/name"
"""Model id used when a route does not name one (TGI routes, chat requests without ``model``)."""

EOS_TOKEN_TEXT: Final = "</s>"
"""Text of the special end-of-sequence token that ends every TGI stream."""

HF_UNAUTHORIZED_MESSAGE: Final = "Invalid credentials in Authorization header"
RATE_LIMIT_MESSAGE: Final = "Rate limit reached. You reached free usage limit (reset hourly)."

_HUMAN_MARKER: Final = "Human: "
_TOKEN_LOGPROB: Final = -0.1
_SSE_MEDIA_TYPE: Final = "text/event-stream"
_SSE_HEADERS: Final = {"cache-control": "no-cache"}


# --------------------------------------------------------------------------------------------
# Faults and behaviour
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Loading:
    """Answer 503 ``{"error": "Model <id> is currently loading", "estimated_time": ...}``."""

    estimated_time: float = 20.0


@dataclass(frozen=True, slots=True)
class RateLimited:
    """Answer 429 ``{"error": "Rate limit reached. ..."}``.

    ``retry_after`` sets the ``Retry-After`` header: a number is sent as whole seconds, rounded
    up (``1.2`` -> ``"2"``); a string is sent verbatim (e.g. ``"1.5"`` or an HTTP date);
    ``None`` sends no header.
    """

    retry_after: float | str | None = None


@dataclass(frozen=True, slots=True)
class HttpError:
    """Answer ``status`` with an error body.

    Hugging Face routes get ``{"error": message}`` (plus ``"error_type": error_type`` when set,
    which makes ``huggingface_hub`` raise its TGI error classes such as ``OverloadedError``).
    Chat routes get the OpenAI form ``{"error": {"message", "type", "param", "code": status}}``
    where ``type`` is ``error_type`` or ``"server_error"`` / ``"invalid_request_error"``.
    """

    status: int = 500
    message: str = "Internal Server Error"
    error_type: str | None = None


@dataclass(frozen=True, slots=True)
class Hang:
    """Sleep ``seconds`` before answering (normally). Cut short when the server stops."""

    seconds: float


@dataclass(frozen=True, slots=True)
class CutStream:
    """Drop the connection mid-answer, so the client sees a transport error, not a clean end.

    A streaming request gets its response headers and the first ``after_pieces`` reply pieces
    (for chat, after the initial role chunk), then the connection is closed: no final event,
    no ``[DONE]``. A non-streaming request gets its headers (with the full ``Content-Length``)
    and half of its JSON body, then the connection is closed; ``after_pieces`` is ignored.
    """

    after_pieces: int = 0


Fault: TypeAlias = Loading | RateLimited | HttpError | Hang | CutStream
"""One scripted misbehaviour, consumed by one generation request."""


@dataclass
class ModelServerBehaviour:
    """How a :class:`ModelServer` answers; tests may change any field at any time.

    Every field is read when a request arrives (the streaming delays: when each piece is sent),
    so changes apply to the next request.
    """

    token_delay: float = 0.0
    """Seconds between streamed pieces (also before the final ``</s>`` / ``finish_reason``)."""

    first_token_delay: float = 0.0
    """Seconds between the response headers and the first piece. Non-streaming answers wait
    ``first_token_delay + token_delay * pieces`` in total before answering."""

    script: list[Fault] = field(default_factory=list)
    """Faults consumed from the front, one per generation request that passed the checks
    (JSON body, auth, required fields). An empty script means "answer normally"."""

    faults_for: dict[str, Fault] = field(default_factory=dict)
    """Standing faults by text: a generation request whose last user text (chat) or inputs
    (text generation) contains a key gets that fault, every time, and the script is not
    consumed. Lets one session misbehave while the others are answered normally."""

    reply_override: str | None = None
    """Reply with this text instead of the echo (stop strings still apply)."""

    ignore_stop: bool = False
    """Ignore the request's stop strings (both protocols), like a server that does not support
    them: the whole reply is sent, so the client's own cut can be tested."""

    require_token: str | None = None
    """When set, generation and model-list requests need ``Authorization: Bearer <token>``;
    others get 401 (without consuming the script)."""

    hf_dict_response: bool = False
    """Answer non-streaming text generation with ``{"generated_text", "details"}`` instead of
    the legacy ``[{"generated_text"}]`` list."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One generation request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    """Request headers, names lower-cased (e.g. ``headers["authorization"]``)."""
    body: dict[str, Any]

    @property
    def bearer_token(self) -> str | None:
        """The token of an ``Authorization: Bearer <token>`` header, if any."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" and token else None


# --------------------------------------------------------------------------------------------
# Reply content
# --------------------------------------------------------------------------------------------


def hf_echo_reply(inputs: str) -> str:
    """The text-generation echo: ``f"echo: {last_human}"``.

    ``last_human`` is the text after the last ``"Human: "`` in ``inputs`` up to the end of that
    line, stripped. Without any ``"Human: "`` the whole stripped input is echoed.
    """
    index = inputs.rfind(_HUMAN_MARKER)
    if index < 0:
        return f"echo: {inputs.strip()}"
    rest = inputs[index + len(_HUMAN_MARKER) :]
    line = rest.splitlines()[0] if rest else ""
    return f"echo: {line.strip()}"


def _message_text(content: object) -> str:
    """Text of a chat message ``content``: a string, or the text parts of a part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def chat_echo_reply(messages: Sequence[object]) -> str:
    """The chat echo: ``f"echo: {content of the last message whose role is user}"``."""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return f"echo: {_message_text(message.get('content'))}"
    return "echo: "


def split_pieces(text: str) -> list[str]:
    """Split ``text`` into streamed pieces: each word with the whitespace before it.

    ``"".join(split_pieces(text)) == text`` always holds (trailing whitespace is kept on the
    last piece); ``split_pieces("echo: hi there") == ["echo:", " hi", " there"]``.
    """
    pieces = re.findall(r"\s*\S+", text)
    rest = text[sum(len(piece) for piece in pieces) :]
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces.append(rest)
    return pieces


def apply_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` before the earliest occurrence of any (non-empty) stop string."""
    cut = len(text)
    for sequence in stop:
        if sequence:
            index = text.find(sequence)
            if 0 <= index < cut:
                cut = index
    return text[:cut]


def _stop_list(value: object) -> list[str]:
    """Normalise a ``stop`` parameter (a string, a list of strings or nothing) to a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


# --------------------------------------------------------------------------------------------
# Connection aborts
# --------------------------------------------------------------------------------------------


class _ConnectionAbort(Exception):
    """Raised inside a response to make uvicorn close the connection mid-answer.

    uvicorn closes the transport when the app raises after the response has started; the
    traceback it would log at ERROR is dropped by :class:`_AbortLogFilter`.
    """


def _is_abort(exc: BaseException | None, depth: int = 0) -> bool:
    """Whether ``exc`` is, wraps or is caused by a :class:`_ConnectionAbort`."""
    if exc is None or depth > 10:
        return False
    if isinstance(exc, _ConnectionAbort):
        return True
    if isinstance(exc, BaseExceptionGroup) and any(
        _is_abort(inner, depth + 1) for inner in exc.exceptions
    ):
        return True
    return _is_abort(exc.__cause__, depth + 1) or _is_abort(exc.__context__, depth + 1)


class _AbortLogFilter(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" record for deliberate aborts only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_abort(record.exc_info[1]))


_ABORT_LOG_FILTER: Final = _AbortLogFilter()


def _install_abort_log_filter() -> None:
    """Attach :data:`_ABORT_LOG_FILTER` to uvicorn's error logger (idempotent)."""
    uvicorn_error = logging.getLogger("uvicorn.error")
    if _ABORT_LOG_FILTER not in uvicorn_error.filters:
        uvicorn_error.addFilter(_ABORT_LOG_FILTER)


class _TruncatedResponse(Response):
    """Sends the headers (full ``Content-Length``) and half the body, then drops the link."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send(
            {
                "type": "http.response.body",
                "body": self.body[: len(self.body) // 2],
                "more_body": True,
            }
        )
        raise _ConnectionAbort("CutStream: connection dropped on purpose")


# --------------------------------------------------------------------------------------------
# Helpers for answers
# --------------------------------------------------------------------------------------------


def _sse(payload: object) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _retry_after_header(retry_after: float | str | None) -> dict[str, str]:
    if retry_after is None:
        return {}
    if isinstance(retry_after, str):
        return {"retry-after": retry_after}
    return {"retry-after": str(max(0, math.ceil(retry_after)))}


def _openai_error(
    status: int, message: str, error_type: str | None = None, code: object = None
) -> JSONResponse:
    """An OpenAI-style error response."""
    if error_type is None:
        error_type = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def _token(index: int, text: str, *, special: bool = False) -> dict[str, Any]:
    return {"id": index, "text": text, "logprob": _TOKEN_LOGPROB, "special": special}


def _word_count(messages: Sequence[object]) -> int:
    return sum(
        len(_message_text(message.get("content")).split())
        for message in messages
        if isinstance(message, Mapping)
    )


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class ModelServer:
    """A local model server (TGI text generation + OpenAI chat) on a real HTTP socket.

    Use as an async context manager (or call :meth:`start` / :meth:`stop`) inside the event
    loop that the clients use::

        async with ModelServer(ModelServerBehaviour(token_delay=0.01)) as server:
            url = server.url  # e.g. "http://127.0.0.1:41234"

    Attributes:
        behaviour: the live :class:`ModelServerBehaviour`; mutate it (or replace it) freely.
        model_id: the model id used where a request does not name one.
        requests: the JSON body of every generation request received, in order.
        received: the same requests with their method, path and headers.
        app: the Starlette application (usable with any ASGI server).
    """

    def __init__(
        self,
        behaviour: ModelServerBehaviour | None = None,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        host: str = "127.0.0.1",
        port: int = 0,
        shutdown_timeout: int = 5,
    ) -> None:
        """Prepare (but do not start) a server.

        Args:
            behaviour: initial behaviour; a default one when omitted.
            model_id: model id for routes and requests that do not name one.
            host: address to bind.
            port: port to bind; ``0`` picks a free one (read it from :attr:`url`).
            shutdown_timeout: seconds :meth:`stop` waits for in-flight responses before
                cancelling them (scripted sleeps are cut short on stop anyway).
        """
        self.behaviour = behaviour if behaviour is not None else ModelServerBehaviour()
        self.model_id = model_id
        self.requests: list[dict[str, Any]] = []
        self.received: list[RecordedRequest] = []
        self._host = host
        self._port = port
        self._shutdown_timeout = shutdown_timeout
        self._served: InProcessServer | None = None
        self._closing = asyncio.Event()
        self._ids = itertools.count(1)
        self.app = Starlette(
            routes=[
                Route("/", self._tgi, methods=["POST"]),
                Route("/generate", self._tgi, methods=["POST"]),
                Route("/generate_stream", self._tgi_stream, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/chat/completions", self._chat, methods=["POST"]),
                Route("/models/{model_id:path}/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/models/{model_id:path}", self._tgi, methods=["POST"]),
                Route("/v1/models", self._list_models, methods=["GET"]),
                Route("/models", self._list_models, methods=["GET"]),
            ]
        )

    # -- addresses and recordings ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (only while running)."""
        if self._served is None:
            raise RuntimeError("ModelServer is not running")
        return self._served.port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (only while running)."""
        return f"http://{self._host}:{self.port}"

    @property
    def hf_model_url(self) -> str:
        """URL of :attr:`model_id` on the Inference API route, ``{url}/models/{model_id}``."""
        return f"{self.url}/models/{self.model_id}"

    @property
    def openai_base_url(self) -> str:
        """``base_url`` for OpenAI clients, ``{url}/v1``."""
        return f"{self.url}/v1"

    @property
    def request_headers(self) -> list[dict[str, str]]:
        """Headers (lower-cased names) of every generation request, aligned with requests."""
        return [recorded.headers for recorded in self.received]

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        self.requests.clear()
        self.received.clear()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, start serving in a task of the running loop and wait until listening."""
        if self._served is not None:
            raise RuntimeError("ModelServer is already running")
        _install_abort_log_filter()
        self._closing.clear()
        served = InProcessServer(
            self.app,
            host=self._host,
            port=self._port,
            http="h11",
            ws="none",
            lifespan="off",
            timeout_graceful_shutdown=self._shutdown_timeout,
        )
        await served.start()
        self._served = served

    async def stop(self) -> None:
        """Stop serving: finish in-flight answers (sleeps cut short), close every socket."""
        served, self._served = self._served, None
        if served is None:
            return
        self._closing.set()
        await served.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- shared request handling -------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the server is stopping.

        Always yields to the event loop, even for no delay: between two streamed pieces that
        lets uvicorn notice a client that went away (its ``send`` then becomes a no-op and
        Starlette cancels the stream) instead of writing every piece to a dead socket.
        """
        if seconds <= 0 or self._closing.is_set():
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)

    async def _piece_delay(self, index: int) -> None:
        behaviour = self.behaviour
        await self._sleep(behaviour.first_token_delay if index == 0 else behaviour.token_delay)

    async def _total_delay(self, tokens: int) -> None:
        behaviour = self.behaviour
        await self._sleep(behaviour.first_token_delay + behaviour.token_delay * max(0, tokens - 1))

    @staticmethod
    async def _json_body(request: Request) -> dict[str, Any] | None:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return None
        return body if isinstance(body, dict) else None

    def _record(self, request: Request, body: dict[str, Any]) -> None:
        self.requests.append(body)
        self.received.append(
            RecordedRequest(
                method=request.method,
                path=request.url.path,
                headers={name.lower(): value for name, value in request.headers.items()},
                body=body,
            )
        )

    def _authorized(self, request: Request) -> bool:
        token = self.behaviour.require_token
        return token is None or request.headers.get("authorization") == f"Bearer {token}"

    def _next_fault(self, text: str) -> Fault | None:
        for marker, fault in self.behaviour.faults_for.items():
            if marker in text:
                return fault
        script = self.behaviour.script
        return script.pop(0) if script else None

    async def _apply_fault(
        self, fault: Fault | None, *, model_id: str, openai_style: bool
    ) -> Response | CutStream | None:
        """Run ``fault``: an error response to send, a :class:`CutStream`, or ``None``."""
        match fault:
            case None:
                return None
            case Loading(estimated_time=estimated_time):
                body = {
                    "error": f"Model {model_id} is currently loading",
                    "estimated_time": estimated_time,
                }
                return JSONResponse(body, status_code=503)
            case RateLimited(retry_after=retry_after):
                return JSONResponse(
                    {"error": RATE_LIMIT_MESSAGE},
                    status_code=429,
                    headers=_retry_after_header(retry_after),
                )
            case HttpError(status=status, message=message, error_type=error_type):
                if openai_style:
                    return _openai_error(status, message, error_type, code=status)
                error: dict[str, Any] = {"error": message}
                if error_type is not None:
                    error["error_type"] = error_type
                return JSONResponse(error, status_code=status)
            case Hang(seconds=seconds):
                await self._sleep(seconds)
                return None
            case CutStream():
                return fault
            case _:
                assert_never(fault)

    # -- Hugging Face text generation --------------------------------------------------------

    async def _tgi(self, request: Request) -> Response:
        return await self._text_generation(request, force_stream=False)

    async def _tgi_stream(self, request: Request) -> Response:
        return await self._text_generation(request, force_stream=True)

    async def _text_generation(self, request: Request, *, force_stream: bool) -> Response:
        body = await self._json_body(request)
        if body is None:
            return JSONResponse(
                {"error": "Request body must be a JSON object", "error_type": "validation"},
                status_code=400,
            )
        self._record(request, body)
        if not self._authorized(request):
            return JSONResponse({"error": HF_UNAUTHORIZED_MESSAGE}, status_code=401)
        inputs = body.get("inputs")
        raw_parameters = body.get("parameters")
        if not isinstance(inputs, str) or not isinstance(raw_parameters, dict | None):
            return JSONResponse(
                {
                    "error": "`inputs` must be a string and `parameters` an object",
                    "error_type": "validation",
                },
                status_code=422,
            )
        parameters: dict[str, Any] = raw_parameters or {}
        model_id = str(request.path_params.get("model_id", self.model_id))

        outcome = await self._apply_fault(
            self._next_fault(hf_echo_reply(inputs)), model_id=model_id, openai_style=False
        )
        if isinstance(outcome, Response):
            return outcome
        cut = outcome

        override = self.behaviour.reply_override
        reply = override if override is not None else hf_echo_reply(inputs)
        if not self.behaviour.ignore_stop:
            reply = apply_stop(reply, _stop_list(parameters.get("stop")))
        pieces = split_pieces(reply)
        full_text = inputs + reply if parameters.get("return_full_text") is True else reply
        want_details = parameters.get("details") is True
        seed = parameters.get("seed")

        if force_stream or body.get("stream") is True:
            events = self._tgi_events(
                pieces, full_text, want_details, seed, cut, len(inputs.split())
            )
            return StreamingResponse(events, media_type=_SSE_MEDIA_TYPE, headers=_SSE_HEADERS)

        answer: dict[str, Any] = {"generated_text": full_text}
        if want_details:
            tokens = [_token(i, piece) for i, piece in enumerate(pieces)]
            tokens.append(_token(len(pieces), EOS_TOKEN_TEXT, special=True))
            answer["details"] = {
                "finish_reason": "eos_token",
                "generated_tokens": len(tokens),
                "seed": seed,
                "prefill": [],
                "tokens": tokens,
            }
        elif self.behaviour.hf_dict_response:
            answer["details"] = None
        payload: object = answer if self.behaviour.hf_dict_response else [answer]
        if cut is not None:
            return _TruncatedResponse(json.dumps(payload), media_type="application/json")
        await self._total_delay(len(pieces) + 1)
        return JSONResponse(payload)

    async def _tgi_events(
        self,
        pieces: list[str],
        full_text: str,
        want_details: bool,
        seed: object,
        cut: CutStream | None,
        input_length: int,
    ) -> AsyncIterator[bytes]:
        for index, piece in enumerate(pieces):
            if cut is not None and index >= cut.after_pieces:
                break
            await self._piece_delay(index)
            yield _sse(
                {
                    "index": index,
                    "token": _token(index, piece),
                    "generated_text": None,
                    "details": None,
                }
            )
        if cut is not None:
            raise _ConnectionAbort("CutStream: connection dropped on purpose")
        end = len(pieces)
        await self._piece_delay(end)
        details = (
            {
                "finish_reason": "eos_token",
                "generated_tokens": end + 1,
                "input_length": input_length,
                "seed": seed,
            }
            if want_details
            else None
        )
        yield _sse(
            {
                "index": end,
                "token": _token(end, EOS_TOKEN_TEXT, special=True),
                "generated_text": full_text,
                "details": details,
            }
        )

    # -- OpenAI chat completions -------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        body = await self._json_body(request)
        if body is None:
            return _openai_error(400, "Request body must be a JSON object")
        self._record(request, body)
        if not self._authorized(request):
            return _openai_error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _openai_error(400, "`messages` must be a list")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = str(request.path_params.get("model_id", self.model_id))

        outcome = await self._apply_fault(
            self._next_fault(chat_echo_reply(messages)), model_id=model, openai_style=True
        )
        if isinstance(outcome, Response):
            return outcome
        cut = outcome

        override = self.behaviour.reply_override
        reply = override if override is not None else chat_echo_reply(messages)
        if not self.behaviour.ignore_stop:
            reply = apply_stop(reply, _stop_list(body.get("stop")))
        pieces = split_pieces(reply)
        completion_id = f"chatcmpl-{next(self._ids)}"
        created = int(time.time())
        usage = {
            "prompt_tokens": _word_count(messages),
            "completion_tokens": len(pieces),
            "total_tokens": _word_count(messages) + len(pieces),
        }

        if body.get("stream") is True:
            stream_options = body.get("stream_options")
            include_usage = isinstance(stream_options, dict) and bool(
                stream_options.get("include_usage")
            )
            chunks = self._chat_chunks(
                pieces, completion_id, created, model, usage if include_usage else None, cut
            )
            return StreamingResponse(chunks, media_type=_SSE_MEDIA_TYPE, headers=_SSE_HEADERS)

        completion = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        if cut is not None:
            return _TruncatedResponse(json.dumps(completion), media_type="application/json")
        await self._total_delay(len(pieces) + 1)
        return JSONResponse(completion)

    async def _chat_chunks(
        self,
        pieces: list[str],
        completion_id: str,
        created: int,
        model: str,
        usage: dict[str, int] | None,
        cut: CutStream | None,
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
            return _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                }
            )

        yield chunk({"role": "assistant", "content": ""})
        for index, piece in enumerate(pieces):
            if cut is not None and index >= cut.after_pieces:
                break
            await self._piece_delay(index)
            yield chunk({"content": piece})
        if cut is not None:
            raise _ConnectionAbort("CutStream: connection dropped on purpose")
        await self._piece_delay(len(pieces))
        yield chunk({}, "stop")
        if usage is not None:
            yield _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield b"data: [DONE]\n\n"

    async def _list_models(self, request: Request) -> Response:
        if not self._authorized(request):
            return _openai_error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        model = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "tests"}
        return JSONResponse({"object": "list", "data": [model]})


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.model_servers",
        description="Serve the test model server (TGI text generation + OpenAI chat) until "
        "SIGINT/SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: a free port)")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between pieces")
    parser.add_argument(
        "--first-token-delay", type=float, default=0.0, help="seconds before the first piece"
    )
    parser.add_argument("--reply", default=None, help="reply with this text instead of the echo")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="model id (org/name)")
    parser.add_argument(
        "--require-token", default=None, help="require 'Authorization: Bearer TOKEN'"
    )
    parser.add_argument(
        "--hf-dict-response",
        action="store_true",
        help="answer text generation with a dict instead of the legacy list",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO)")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    behaviour = ModelServerBehaviour(
        token_delay=args.token_delay,
        first_token_delay=args.first_token_delay,
        reply_override=args.reply,
        require_token=args.require_token,
        hf_dict_response=args.hf_dict_response,
    )
    server = ModelServer(behaviour, model_id=args.model_id, host=args.host, port=args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        logger.info("model server for %s listening on %s", args.model_id, server.url)
        await stop.wait()
        logger.info("stopping model server")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a :class:`ModelServer` in the foreground until SIGINT or SIGTERM.

    Returns the exit status: 0 after a signal, 1 if the server could not start.
    """
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_run(args))
    except RuntimeError as exc:  # startup failure, e.g. the port is taken
        logger.error("model server failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
