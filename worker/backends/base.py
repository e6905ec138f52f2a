"""What every model backend offers the worker, and the failures it may report."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from core.models import ErrorCode, Message

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


class ModelBackend(abc.ABC):
    """Generates a reply to the last message of a conversation, streamed as text deltas."""

    #: How many generations this backend can usefully run at once (None: no limit of its own).
    max_concurrency: int | None = None
    #: Generations in flight per worker when WORKER_CONCURRENCY is unset. A remote API answers
    #: hundreds of requests at once and each generation mostly waits on the network, so the
    #: default is high; a backend bound by its own hardware caps it with `max_concurrency`
    #: (the local model: what it can batch).
    default_concurrency: int = 256

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load or connect; called once at worker startup."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what `start` took."""

    @abc.abstractmethod
    def stream_reply(self, history: Sequence[Message]) -> AsyncIterator[str]:
        """Yield the reply in pieces. `history` ends with the human message to answer.

        Raises ModelFailure when no reply can be had; the caller bounds the total time.
        """


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
