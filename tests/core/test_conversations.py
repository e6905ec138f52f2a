"""Conversations in the store (API v1): owners and their index, titles, reset and delete,
against a real Redis with RedisJSON."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from core.conversations import BadCursor
from core.models import Message, MessageEvent, Source, new_id
from core.store import Queued, ReplyOutcome, SessionStore
from tests.support import sessions


def _reply(human: Message) -> tuple[Message, MessageEvent]:
    reply = Message(source=Source.BOT, msg="a", reply_to=human.id)
    return reply, MessageEvent(id=reply.id, reply_to=human.id, msg="a", timestamp=reply.timestamp)


async def test_a_tutorial_session_has_no_title_or_owner_until_a_message_names_it(
    store: SessionStore, redis: Redis
) -> None:
    session = await store.create("Ann")
    document: Any = await redis.json().get(store.keys.session(session.token))
    # `answered` and `schema`: the store's index of the history (core/lua/lib_answered.lua).
    assert set(document) == {"token", "name", "session_start", "messages", "answered", "schema"}
    await sessions.add_human_message(store, session.token, "\n  What is Redis?  \nmore")
    await sessions.add_human_message(store, session.token, "second")
    got = await store.get(session.token)
    assert got is not None and got.title == "What is Redis?" and got.user_id is None


async def test_a_long_first_line_is_cut_and_a_set_title_is_kept(store: SessionStore) -> None:
    session = await store.create("Ann", title="Mine")
    await sessions.add_human_message(store, session.token, "x" * 500)
    got = await store.get(session.token)
    assert got is not None and got.title == "Mine"
    other = await store.create("Bob")
    await sessions.add_human_message(store, other.token, "y" * 500)
    got = await store.get(other.token)
    assert got is not None and got.title == "y" * 79 + "…"


async def test_set_title_renames_and_tells_the_sockets(store: SessionStore, redis: Redis) -> None:
    session = await store.create("Ann")
    async with redis.pubsub() as pubsub:
        await pubsub.ssubscribe(store.keys.events(session.token))
        await pubsub.get_message(timeout=1)
        assert await store.set_title(session.token, "Trip to Oslo") is True
        event = await pubsub.get_message(timeout=2)
    assert event is not None
    assert json.loads(event["data"]) == {
        "type": "conversation",
        "change": "title",
        "title": "Trip to Oslo",
    }
    got = await store.get(session.token)
    assert got is not None and got.title == "Trip to Oslo"
    assert await store.set_title(new_id(), "x") is False
    assert await store.set_title("not-a-token", "x") is False


async def test_reset_empties_the_history_and_a_late_reply_is_not_stored(
    store: SessionStore, redis: Redis
) -> None:
    session = await store.create("Ann")
    human = await sessions.add_human_message(store, session.token, "q")
    assert human is not None
    await redis.set(store.keys.lease(session.token), "me")
    async with redis.pubsub() as pubsub:
        await pubsub.ssubscribe(store.keys.control_for(session.token))
        await pubsub.get_message(timeout=1)
        assert await store.reset(session.token) is True
        stop = await pubsub.get_message(timeout=2)
    assert stop is not None and json.loads(stop["data"])["token"] == session.token
    assert (await store.messages_and_stop(session.token))[1] is not None
    assert await store.add_reply(session.token, *_reply(human), "me") is ReplyOutcome.QUESTION_GONE
    assert await sessions.messages(store, session.token) == []
    again = await sessions.add_human_message(store, session.token, "again")
    assert again is not None  # the backlog counter went back to 0 with the history
    assert await store.add_reply(session.token, *_reply(again), "me") is ReplyOutcome.STORED
    # The history's index went with it: the first message, sent again, is stored again.
    resent = await store.queue_message(session.token, "q", rate_limited=False, message_id=human.id)
    assert isinstance(resent, Queued)
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["again", "a", "q"]


async def test_delete_removes_the_session_and_its_index_entry(
    store: SessionStore, redis: Redis
) -> None:
    user_id = new_id()
    session = await store.create("Ann", user_id=user_id)
    human = await sessions.add_human_message(store, session.token, "q")
    assert human is not None
    await redis.set(store.keys.lease(session.token), "me")
    assert await store.index.tokens(user_id) == [session.token]
    async with redis.pubsub() as pubsub:
        await pubsub.ssubscribe(store.keys.events(session.token))
        await pubsub.get_message(timeout=1)
        assert await store.delete(session.token) is True
        event = await pubsub.get_message(timeout=2)
    assert event is not None
    assert json.loads(event["data"]) == {"type": "conversation", "change": "deleted"}
    assert await store.get(session.token) is None
    assert await store.index.tokens(user_id) == []
    assert await store.add_reply(session.token, *_reply(human), "me") is ReplyOutcome.SESSION_GONE
    assert await store.delete(session.token) is False


async def test_the_index_pages_by_latest_activity_with_a_stable_cursor(
    store: SessionStore,
) -> None:
    user_id = new_id()
    created = []
    for i in range(5):
        created.append(await store.create(f"c{i}", user_id=user_id))
        await asyncio.sleep(0.005)  # distinct milliseconds (ties are tested below)
    await sessions.add_human_message(store, created[1].token, "bump")
    newest_first = [created[1].token] + [s.token for s in reversed(created) if s is not created[1]]
    first = await store.index.page(user_id, 2, None)
    assert [e.token for e in first.entries] == newest_first[:2]
    assert first.next_cursor is not None
    second = await store.index.page(user_id, 2, first.next_cursor)
    assert [e.token for e in second.entries] == newest_first[2:4]
    third = await store.index.page(user_id, 2, second.next_cursor)
    assert [e.token for e in third.entries] == newest_first[4:] and third.next_cursor is None
    with pytest.raises(BadCursor):
        await store.index.page(user_id, 2, "%%%")


async def test_ties_in_activity_are_paged_without_loss(store: SessionStore) -> None:
    user_id = new_id()
    tokens = sorted(new_id() for _ in range(5))
    for token in tokens:
        await store.index.add(user_id, token, 1000)
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.index.page(user_id, 2, cursor)
        seen += [e.token for e in page.entries]
        if (cursor := page.next_cursor) is None:
            break
    assert seen == sorted(tokens, reverse=True)


async def test_activity_never_readds_a_removed_conversation(store: SessionStore) -> None:
    user_id = new_id()
    session = await store.create("Ann", user_id=user_id)
    await store.index.remove(user_id, session.token)
    await store.index.touch(user_id, session.token, 10**13)
    assert await store.index.tokens(user_id) == []
