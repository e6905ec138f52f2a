"""The per-user index of conversations: which sessions an account owns, by last activity.

A session document lives in its own slot (on a Redis Cluster) and the index in its user's,
so the two are never written in one atomic step. The order of the steps makes a failure in
between harmless: a conversation is added to the index before its document is written, and
removed from it after the document is gone; a listing drops (and removes) the entries whose
document has expired or was deleted. So the index may briefly name a conversation that is
gone, and never misses one that exists ("repaired on read", docs/architecture.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from core.keys import Keys
from core.redis import AnyRedis

BAD_CURSOR = "Invalid cursor: pass the next_cursor of an earlier page"


class BadCursor(ValueError):
    """A pagination cursor this index did not write."""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    token: str
    updated_ms: int


@dataclass(frozen=True, slots=True)
class IndexPage:
    entries: list[IndexEntry]
    next_cursor: str | None


# A cursor is a position, "<score>.<token>": any such text is one (the next page is what comes
# after it, whether or not an entry sits there), so the OpenAPI schema's pattern says exactly
# which cursors are accepted. Clients treat it as opaque.
CURSOR_PATTERN = (
    r"^[0-9]{1,15}\.[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(entry: IndexEntry) -> str:
    return f"{entry.updated_ms}.{entry.token}"


def decode_cursor(cursor: str) -> IndexEntry:
    if not _CURSOR.fullmatch(cursor):
        raise BadCursor(BAD_CURSOR)
    score, token = cursor.split(".", 1)
    return IndexEntry(token, int(score))


class ConversationIndex:
    """Owns `Keys.user_conversations`: member = session token, score = last activity (ms)."""

    def __init__(self, redis: AnyRedis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def add(self, user_id: str, token: str, now_ms: int) -> None:
        await self.redis.zadd(self.keys.user_conversations(user_id), {token: now_ms})

    async def touch(self, user_id: str, token: str, now_ms: int) -> None:
        """New activity; never moves an entry back in time (a late, slower writer) and never
        re-adds one that was removed (a message racing a delete)."""
        await self.redis.zadd(
            self.keys.user_conversations(user_id), {token: now_ms}, xx=True, gt=True
        )

    async def remove(self, user_id: str, *tokens: str) -> None:
        if tokens:
            await self.redis.zrem(self.keys.user_conversations(user_id), *tokens)

    async def tokens(self, user_id: str) -> list[str]:
        members: list[Any] = await self.redis.zrange(self.keys.user_conversations(user_id), 0, -1)
        return [_text(member) for member in members]

    async def drop(self, user_id: str) -> None:
        await self.redis.delete(self.keys.user_conversations(user_id))

    async def page(self, user_id: str, limit: int, cursor: str | None) -> IndexPage:
        """Newest activity first, `limit` entries after `cursor` (keyset pagination: stable
        while conversations are added or move up, unlike an offset). Ties in the score are
        ordered by token, as Redis orders them."""
        key = self.keys.user_conversations(user_id)
        rows: list[Any]
        if cursor is None:
            rows = await self.redis.zrange(
                key,
                "+inf",
                "-inf",
                desc=True,
                byscore=True,
                offset=0,
                num=limit + 1,
                withscores=True,
            )
        else:
            after = decode_cursor(cursor)
            ties = await self.redis.zrange(
                key, after.updated_ms, after.updated_ms, byscore=True, withscores=True
            )
            older = await self.redis.zrange(
                key,
                f"({after.updated_ms}",
                "-inf",
                desc=True,
                byscore=True,
                offset=0,
                num=limit + 1,
                withscores=True,
            )
            same: list[Any] = [row for row in reversed(ties) if _text(row[0]) < after.token]
            rows = (same + list(older))[: limit + 1]
        entries = [IndexEntry(_text(row[0]), int(row[1])) for row in rows]
        more = len(entries) > limit
        entries = entries[:limit]
        return IndexPage(entries, encode_cursor(entries[-1]) if more and entries else None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
