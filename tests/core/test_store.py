"""The session store against a real Redis with RedisJSON: atomic writes, TTLs, exactly once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import Redis

from core.config import Settings
from core.models import Message, MessageEvent, Source, new_id
from core.store import ReplyOutcome, SessionStore
from tests.conftest import make_settings


async def test_create_stores_a_json_document_with_ttl(
    store: SessionStore, redis: Redis, settings: Settings
) -> None:
    session = await store.create("Ann")
    key = store.keys.session(session.token)
    assert await redis.type(key) == "ReJSON-RL"
    document: Any = await redis.json().get(key)
    assert document["name"] == "Ann"
    assert document["messages"] == []
    assert 0 < await redis.ttl(key) <= settings.session_ttl_seconds


async def test_get_unknown_and_malformed_tokens(store: SessionStore) -> None:
    assert await store.get(new_id()) is None
    assert await store.get("*") is None
    assert await store.touch("not-a-token") is False


async def test_human_message_is_stored_queued_and_announced_together(
    store: SessionStore, redis: Redis
) -> None:
    session = await store.create("Ann")
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(store.keys.events(session.token))
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        message = await store.add_human_message(session.token, "hello")
        assert message is not None
        announced = await pubsub.get_message(timeout=2)
    assert announced is not None
    assert json.loads(announced["data"])["type"] == "ack"
    assert json.loads(announced["data"])["id"] == message.id
    stored = await store.messages(session.token)
    assert stored is not None and [m.msg for m in stored] == ["hello"]
    entries: Any = await redis.xrange(store.keys.requests)
    assert entries[-1][1] == {"token": session.token, "id": message.id}


async def test_message_to_an_expired_session_is_neither_stored_nor_queued(
    store: SessionStore, redis: Redis
) -> None:
    token = new_id()
    assert await store.add_human_message(token, "hello?") is None
    assert await redis.exists(store.keys.session(token)) == 0
    assert await redis.xlen(store.keys.requests) == 0


async def test_messages_renew_the_ttl(redis_url: str, redis: Redis) -> None:
    store = SessionStore(redis, make_settings(redis_url, session_ttl_seconds=3))
    session = await store.create("Ann")
    key = store.keys.session(session.token)
    await redis.expire(key, 1)
    await store.add_human_message(session.token, "still here")
    assert await redis.ttl(key) > 1


async def test_session_expires(redis_url: str, redis: Redis) -> None:
    store = SessionStore(redis, make_settings(redis_url, session_ttl_seconds=1))
    session = await store.create("Ann")
    await asyncio.sleep(1.3)
    assert await store.get(session.token) is None


async def test_a_reply_is_stored_once_and_only_by_the_lease_holder(
    store: SessionStore, redis: Redis
) -> None:
    session = await store.create("Ann")
    human = await store.add_human_message(session.token, "q")
    assert human is not None
    await redis.set(store.keys.lock(session.token), "me")

    def reply() -> tuple[Message, MessageEvent]:
        message = Message(source=Source.BOT, msg="a", reply_to=human.id)
        event = MessageEvent(id=message.id, reply_to=human.id, msg="a", timestamp=message.timestamp)
        return message, event

    assert await store.add_reply(session.token, *reply(), "someone-else") is ReplyOutcome.LOCK_LOST
    assert await store.add_reply(session.token, *reply(), "me") is ReplyOutcome.STORED
    assert await store.add_reply(session.token, *reply(), "me") is ReplyOutcome.ALREADY_ANSWERED
    stored = await store.messages(session.token)
    assert stored is not None
    assert [m.source for m in stored] == [Source.HUMAN, Source.BOT]

    await redis.delete(store.keys.session(session.token))
    assert await store.add_reply(session.token, *reply(), "me") is ReplyOutcome.SESSION_GONE


async def test_stop_request_is_remembered_and_broadcast(store: SessionStore, redis: Redis) -> None:
    token = new_id()
    assert await store.stop_requested_at(token) is None
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(store.keys.control)
        await pubsub.get_message(timeout=1)
        await store.request_stop(token)
        command = await pubsub.get_message(timeout=2)
    assert command is not None and json.loads(command["data"]) == {"type": "stop", "token": token}
    assert await store.stop_requested_at(token) is not None
