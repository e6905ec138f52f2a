"""Accounts (API v1): users and their API keys.

An API key is shown once, when the account is made, and stored only as its SHA-256. A key is
32 random bytes, so a fast hash is enough: there is nothing to guess that a slow one would
protect (the same reasoning as GitHub's and Stripe's keys). Accounts have no TTL.

Keys written here, and in which order (each step is idempotent; on a Redis Cluster they sit in
different slots): the user's hash (`Keys.user`, slot of `{user_id}`), the list of all users
(`Keys.users`), then the key's lookup (`Keys.api_key`). Deleting goes the other way: the
lookup first, so the key stops working before anything else is removed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime
from typing import Any

from core.conversations import IndexEntry, decode_cursor, encode_cursor
from core.keys import Keys
from core.models import User, is_uuid4, new_id, utcnow
from core.redis import AnyRedis

API_KEY_PREFIX = "chat_"


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class AccountStore:
    """Owns `Keys.user`, `Keys.users` and `Keys.api_key`."""

    def __init__(self, redis: AnyRedis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def register(self, name: str) -> tuple[User, str]:
        """A new account and its API key (the only time the key is seen in clear)."""
        user = User(user_id=new_id(), name=name, created=utcnow())
        api_key = new_api_key()
        digest = key_hash(api_key)
        await self.redis.hset(
            self.keys.user(user.user_id),
            mapping={"name": user.name, "created": user.created.isoformat(), "key_hash": digest},
        )
        await self.redis.zadd(self.keys.users, {user.user_id: _epoch_ms(user.created)})
        await self.redis.set(self.keys.api_key(digest), user.user_id)
        return user, api_key

    async def by_key(self, api_key: str) -> User | None:
        """The account an API key opens, or None (unknown, or revoked)."""
        digest = key_hash(api_key)
        user_id = await self.redis.get(self.keys.api_key(digest))
        if user_id is None:
            return None
        fields = await self._fields(_text(user_id))
        if fields is None or not hmac.compare_digest(fields.get("key_hash", ""), digest):
            return None
        return _user(_text(user_id), fields)

    async def get(self, user_id: str) -> User | None:
        fields = await self._fields(user_id) if is_uuid4(user_id) else None
        return None if fields is None else _user(user_id, fields)

    async def page(self, limit: int, cursor: str | None) -> tuple[list[User], str | None]:
        """Accounts oldest first, `limit` after `cursor` (the `next_cursor` of the previous
        page); the next page's cursor, or None at the end. Keyset pagination on (creation
        time, user id), the conversation index's cursor form: an account deleted between two
        pages (the admin deleting what it lists) does not break the next one, as a rank or a
        bare user id would. Raises BadCursor for a cursor it did not write."""
        rows: list[Any]
        if cursor is None:
            rows = await self.redis.zrange(
                self.keys.users,
                "-inf",
                "+inf",
                byscore=True,
                offset=0,
                num=limit + 1,
                withscores=True,
            )
        else:
            after = decode_cursor(cursor)
            ties: list[Any] = await self.redis.zrange(
                self.keys.users, after.updated_ms, after.updated_ms, byscore=True, withscores=True
            )
            newer: list[Any] = await self.redis.zrange(
                self.keys.users,
                f"({after.updated_ms}",
                "+inf",
                byscore=True,
                offset=0,
                num=limit + 1,
                withscores=True,
            )
            same = [row for row in ties if _text(row[0]) > after.token]
            rows = (same + newer)[: limit + 1]
        users = [user for user in [await self.get(_text(row[0])) for row in rows[:limit]] if user]
        if len(rows) <= limit:
            return users, None
        last = rows[limit - 1]
        return users, encode_cursor(IndexEntry(_text(last[0]), int(last[1])))

    async def revoke(self, user_id: str) -> bool:
        """Make the account's key stop working and forget the account; False when unknown.
        Its conversations are the caller's to delete first (SessionStore owns them)."""
        fields = await self._fields(user_id) if is_uuid4(user_id) else None
        if fields is None:
            return False
        if digest := fields.get("key_hash"):
            await self.redis.delete(self.keys.api_key(digest))
        await self.redis.zrem(self.keys.users, user_id)
        await self.redis.delete(self.keys.user(user_id))
        return True

    async def _fields(self, user_id: str) -> dict[str, str] | None:
        raw: dict[Any, Any] = await self.redis.hgetall(self.keys.user(user_id))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None


def _user(user_id: str, fields: dict[str, str]) -> User:
    return User(
        user_id=user_id, name=fields["name"], created=datetime.fromisoformat(fields["created"])
    )


def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
