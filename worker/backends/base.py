"""What every model backend offers the worker, and the failures it may report."""

from __future__ import annotations

import abc
import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.config import Settings
from core.models import ErrorCode, Message
from worker.prompt import chat_turns, fit_history

logger = logging.getLogger(__name__)


class ModelFailure(Exception):
    """A reply could not be generated; `code` and `detail` go to the client as an error event."""

    code: ErrorCode = ErrorCode.MODEL_ERROR

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ModelUnavailable(ModelFailure):
    code = ErrorCode.MODEL_UNAVAILABLE


class ModelError(ModelFailure):
    code = ErrorCode.MODEL_ERROR


class TransientModelError(Exception):
    """A failure worth retrying (connection refused, 429, 503 loading, 5xx)."""

    def __init__(self, detail: str, wait: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.wait = wait


BYTES_PER_TOKEN = 3  # the estimate's divisor (estimate_tokens)
TURN_TOKENS = 4  # a chat turn's role and separators, in the estimate of a chat prompt


def estimate_tokens(text: str) -> int:
    """Tokens of `text` for a model whose tokenizer we do not have: its UTF-8 bytes / 3,
    rounded up. Conservative: English prose runs about 4 characters a token in the common
    tokenizers, and a non-Latin script 1 to 2 characters (3 to 6 bytes) a token, so the prompt
    is cut a little early rather than overflow the context."""
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


@dataclass(slots=True)
class Usage:
    """The token counts of one generation, filled in by the backend: `prompt` when it builds
    the prompt (its own count), both again when the provider reports them (the provider's
    word wins). What is still None when the reply is stored, the responder counts."""

    prompt: int | None = None
    completion: int | None = None


class ModelBackend(abc.ABC):
    """Generates a reply to the last message of a conversation, streamed as text deltas.

    The prompt fits the model: `fit` keeps the newest turns whose prompt, counted by
    `prompt_tokens`, leaves MODEL_MAX_NEW_TOKENS of `context_tokens` for the reply (and cuts
    the newest message itself when it alone is too long), so no message overflows the context.
    """

    #: How many generations this backend can usefully run at once (None: no limit of its own).
    max_concurrency: int | None = None
    #: Generations in flight per worker when WORKER_CONCURRENCY is unset. A remote API answers
    #: hundreds of requests at once and each generation mostly waits on the network, so the
    #: default is high; a backend bound by its own hardware caps it with `max_concurrency`
    #: (the local model: what it can batch).
    default_concurrency: int = 256
    #: The model's context window in tokens (prompt and reply together).
    context_tokens: int = 8192
    #: Tokens kept for the reply (MODEL_MAX_NEW_TOKENS).
    reply_tokens: int = 256
    #: The system prompt the chat form starts with.
    system_prompt: str = ""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load or connect; called once at worker startup."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what `start` took."""

    @abc.abstractmethod
    def stream_reply(
        self, history: Sequence[Message], usage: Usage | None = None
    ) -> AsyncIterator[str]:
        """Yield the reply in pieces. `history` ends with the human message to answer; the
        backend fits it to the context (`fit`) and notes the tokens it used in `usage`.

        Raises ModelFailure when no reply can be had; the caller bounds the total time.
        """

    def size_prompt(self, settings: Settings, context_tokens: int) -> None:
        """Take the context, the reply's room and the system prompt from the settings."""
        self.context_tokens = context_tokens
        self.reply_tokens = settings.model_max_new_tokens
        self.system_prompt = settings.system_prompt

    def count_tokens(self, text: str) -> int:
        """Tokens of a piece of text (a reply): the estimate, unless the backend knows better."""
        return estimate_tokens(text)

    def prompt_tokens(self, history: Sequence[Message]) -> int:
        """Tokens of the prompt `history` makes, in the chat form: every turn's text and its
        overhead, the system prompt's included."""
        turns = chat_turns(history, self.system_prompt)
        return sum(self.count_tokens(turn["content"]) + TURN_TOKENS for turn in turns)

    def fit(self, history: Sequence[Message]) -> list[Message]:
        """The newest part of `history` whose prompt leaves room for the reply."""
        try:
            return fit_history(history, self.prompt_tokens, self.context_tokens - self.reply_tokens)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc


def retry_delay(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    return float(min(cap, base * 2**attempt))


async def stream_with_retries(
    open_stream: Callable[[], AsyncIterator[str]], max_retries: int, what: str
) -> AsyncIterator[str]:
    """Run `open_stream`, retrying transient failures that happen before the first piece.

    A stream that breaks after it has produced text is not retried (the client has seen the
    text): it ends in a ModelError.
    """
    attempt = 0
    while True:
        produced = False
        try:
            async for piece in open_stream():
                produced = True
                yield piece
            return
        except TransientModelError as exc:
            if produced:
                raise ModelError(f"The reply from {what} broke off: {exc.detail}") from exc
            if attempt >= max_retries:
                raise ModelUnavailable(f"{what} is unavailable: {exc.detail}") from exc
            delay = exc.wait if exc.wait is not None else retry_delay(attempt)
            logger.warning("%s: %s; retry %d in %.1fs", what, exc.detail, attempt + 1, delay)
            await asyncio.sleep(delay)
            attempt += 1


RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_SERVER_WAIT = 60.0


def http_failure(status: int, body: object, headers: Mapping[str, str] | None) -> Exception:
    """Map a provider's HTTP error to a retry (with the wait it asks for) or a final failure.

    `body` is the decoded error body: Hugging Face sends `{"error": "...", "estimated_time":
    20.0}` while a model loads, OpenAI-compatible servers `{"error": {"message": ...}}`.
    """
    detail = _error_detail(body)
    if status in RETRY_STATUSES:
        return TransientModelError(f"HTTP {status}: {detail}", wait=_server_wait(body, headers))
    if status in (401, 403):
        return ModelError(
            f"The model provider rejected the credentials (HTTP {status}): {detail}. "
            "Check HF_TOKEN or OPENAI_API_KEY."
        )
    return ModelError(f"The model provider refused the request (HTTP {status}): {detail}")


def _error_detail(body: object) -> str:
    if isinstance(body, dict):
        inner: Any = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner)
        return str(inner)
    return str(body)[:500]


def _server_wait(body: object, headers: Mapping[str, str] | None) -> float | None:
    """How long the server asked us to wait: `estimated_time` (loading) or `Retry-After`."""
    candidates: list[object] = []
    if isinstance(body, dict):
        candidates.append(body.get("estimated_time"))
    if headers is not None:
        candidates.append(headers.get("retry-after"))
    for value in candidates:
        try:
            if value is not None:
                return max(0.0, min(float(str(value)), MAX_SERVER_WAIT))
        except ValueError:
            continue
    return None
