"""Accounts against a real Redis: keys shown once, stored hashed, revoked at once."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from core.accounts import API_KEY_PREFIX, AccountStore, key_hash
from core.conversations import BadCursor
from core.keys import Keys
from core.models import new_id


async def test_a_key_opens_its_account_and_is_stored_only_as_a_hash(redis: Redis) -> None:
    accounts = AccountStore(redis, Keys("acct-test"))
    user, api_key = await accounts.register("Ann")
    assert api_key.startswith(API_KEY_PREFIX) and len(api_key) == len(API_KEY_PREFIX) + 43
    assert await accounts.by_key(api_key) == user
    fields: Any = await redis.hgetall(accounts.keys.user(user.user_id))
    assert api_key not in fields.values() and fields["key_hash"] == key_hash(api_key)
    assert await accounts.by_key(api_key + "x") is None
    assert await accounts.by_key(API_KEY_PREFIX) is None


async def test_revoking_stops_the_key_and_forgets_the_account(redis: Redis) -> None:
    accounts = AccountStore(redis, Keys("acct-test2"))
    user, api_key = await accounts.register("Ann")
    assert await accounts.revoke(user.user_id) is True
    assert await accounts.by_key(api_key) is None
    assert await accounts.get(user.user_id) is None
    assert await accounts.revoke(user.user_id) is False
    assert await accounts.revoke("nope") is False


async def test_accounts_are_listed_in_pages(redis: Redis) -> None:
    accounts = AccountStore(redis, Keys(f"acct-{new_id()[:8]}"))
    made = [(await accounts.register(f"u{i}"))[0] for i in range(5)]
    # Oldest first; accounts made in the same millisecond by id, as Redis orders ties.
    made.sort(key=lambda user: (int(user.created.timestamp() * 1000), user.user_id))
    users, after = await accounts.page(2, None)
    assert users == made[:2] and after is not None
    users, after = await accounts.page(2, after)
    assert after is not None
    users2, end = await accounts.page(2, after)
    assert users == made[2:4] and users2 == made[4:] and end is None


async def test_an_account_deleted_between_pages_does_not_break_the_next(redis: Redis) -> None:
    accounts = AccountStore(redis, Keys(f"acct-{new_id()[:8]}"))
    made = [(await accounts.register(f"u{i}"))[0] for i in range(4)]
    made.sort(key=lambda user: (int(user.created.timestamp() * 1000), user.user_id))
    users, after = await accounts.page(2, None)
    assert after is not None
    await accounts.revoke(users[-1].user_id)
    rest, end = await accounts.page(2, after)
    assert rest == made[2:] and end is None
    with pytest.raises(BadCursor):
        await accounts.page(2, made[0].user_id)  # a bare user id is not a cursor
