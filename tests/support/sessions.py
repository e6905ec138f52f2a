"""Shortcuts the tests take around the socket: store a message with no rate limit, and read a
session's messages. The service itself always goes through `SessionStore.queue_message` and
the responder's own history read, so these live here, not in the store."""

from __future__ import annotations

import contextlib
from typing import Any

from redis.exceptions import ResponseError

from core.keys import Keys
from core.models import Message
from core.redis import AnyRedis
from core.store import Queued, SessionStore


async def add_human_message(
    store: SessionStore, token: str, text: str, client_id: str | None = None
) -> Message | None:
    """Store the message, queue it for a worker and announce it: one atomic step, with no
    rate limit and no backlog cap. Returns None when the session has expired."""
    result = await store.queue_message(
        token, text, client_id, rate_limited=False, backlog_capped=False
    )
    assert result is None or isinstance(result, Queued), result
    return None if result is None else result.message


async def messages(store: SessionStore, token: str) -> list[Message] | None:
    """The session's messages, None when it does not exist (its TTL is left as it is)."""
    found, _ = await store.messages_and_stop(token)
    return found


async def queued_entries(redis: AnyRedis, keys: Keys) -> int:
    """Entries in every partition's request stream (answered ones are deleted)."""
    return sum([int(await redis.xlen(stream)) for stream in keys.streams])


async def pending_entries(redis: AnyRedis, keys: Keys) -> int:
    """Entries taken by a worker and not yet answered, over every partition's stream."""
    total = 0
    for stream in keys.streams:
        with contextlib.suppress(ResponseError):  # no stream or group yet: none pending
            summary: Any = await redis.xpending(stream, keys.group)
            total += int(summary["pending"])
    return total
