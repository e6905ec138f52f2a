"""How many generations a worker runs at once: WORKER_CONCURRENCY when set, else the backend's
own default, never more than the backend can run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from core.config import Settings
from core.models import Message
from worker.backends import ModelBackend
from worker.backends.base import Usage
from worker.backends.local import LocalBackend
from worker.backends.openai_compat import ChatCompletionsBackend
from worker.worker import generation_slots


class Remote(ModelBackend):
    def stream_reply(
        self, history: Sequence[Message], usage: Usage | None = None
    ) -> AsyncIterator[str]:
        raise NotImplementedError


class OneAtATime(Remote):
    max_concurrency = 1


def test_unset_concurrency_is_the_backends_default() -> None:
    settings = Settings(_env_file=None)
    assert settings.worker_concurrency is None
    assert generation_slots(settings, Remote()) == 256
    assert ChatCompletionsBackend.default_concurrency >= 200  # a remote API: hundreds in flight
    assert generation_slots(settings, OneAtATime()) == 1
    assert generation_slots(settings, LocalBackend.__new__(LocalBackend)) == min(
        LocalBackend.default_concurrency, LocalBackend.max_concurrency or 1 << 30
    )


def test_an_explicit_concurrency_wins_within_the_backends_limit() -> None:
    settings = Settings(_env_file=None, worker_concurrency=8)
    assert generation_slots(settings, Remote()) == 8
    assert generation_slots(settings, OneAtATime()) == 1
