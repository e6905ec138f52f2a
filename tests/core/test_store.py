"""The session store against a real Redis with RedisJSON: atomic writes, TTLs, exactly once."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

import core.models
import core.store
from core.config import Settings
from core.models import Message, MessageEvent, Source, new_id
from core.store import (
    BacklogFull,
    LeaseBusy,
    Queued,
    RateLimited,
    ReplyOutcome,
    SessionStore,
)
from tests.conftest import make_settings
from tests.support import sessions
from tests.support.redis_stats import command_calls, monitored


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
        await pubsub.ssubscribe(store.keys.events(session.token))
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        message = await sessions.add_human_message(store, session.token, "hello")
        assert message is not None
        announced = await pubsub.get_message(timeout=2)
    assert announced is not None
    assert json.loads(announced["data"])["type"] == "ack"
    assert json.loads(announced["data"])["id"] == message.id
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["hello"]
    entries: Any = await redis.xrange(store.keys.requests_for(session.token))
    assert entries[-1][1] == {"token": session.token, "id": message.id}


async def test_message_to_an_expired_session_is_neither_stored_nor_queued(
    store: SessionStore, redis: Redis
) -> None:
    token = new_id()
    assert await sessions.add_human_message(store, token, "hello?") is None
    assert await redis.exists(store.keys.session(token)) == 0
    assert await sessions.queued_entries(redis, store.keys) == 0


async def test_messages_renew_the_ttl(redis_url: str, redis: Redis) -> None:
    store = SessionStore(redis, make_settings(redis_url, session_ttl_seconds=3))
    session = await store.create("Ann")
    key = store.keys.session(session.token)
    await redis.expire(key, 1)
    await sessions.add_human_message(store, session.token, "still here")
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
    human = await sessions.add_human_message(store, session.token, "q")
    assert human is not None
    await redis.set(store.keys.lease(session.token), "me")

    def reply() -> tuple[Message, MessageEvent]:
        message = Message(source=Source.BOT, msg="a", reply_to=human.id)
        event = MessageEvent(id=message.id, reply_to=human.id, msg="a", timestamp=message.timestamp)
        return message, event

    attempts = store.keys.attempts(session.token, human.id)
    await redis.set(attempts, 1)
    assert await store.add_reply(session.token, *reply(), "someone-else") is ReplyOutcome.LEASE_LOST
    assert await redis.exists(attempts) == 1  # not answered: the attempt count stays
    assert await store.add_reply(session.token, *reply(), "me") is ReplyOutcome.STORED
    assert await redis.exists(attempts) == 0  # answered: the count goes with it
    await redis.set(attempts, 1)
    assert await store.add_reply(session.token, *reply(), "me") is ReplyOutcome.ALREADY_ANSWERED
    assert await redis.exists(attempts) == 0
    stored = await sessions.messages(store, session.token)
    assert stored is not None
    assert [m.source for m in stored] == [Source.HUMAN, Source.BOT]

    await redis.delete(store.keys.session(session.token))
    assert await store.add_reply(session.token, *reply(), "me") is ReplyOutcome.SESSION_GONE


async def test_stop_request_is_remembered_and_broadcast(store: SessionStore, redis: Redis) -> None:
    token = new_id()
    assert (await store.messages_and_stop(token))[1] is None
    async with redis.pubsub() as pubsub:
        await pubsub.ssubscribe(store.keys.control_for(token))
        await pubsub.get_message(timeout=1)
        await store.request_stop(token)
        command = await pubsub.get_message(timeout=2)
    assert command is not None and json.loads(command["data"]) == {"type": "stop", "token": token}
    assert (await store.messages_and_stop(token))[1] is not None


# --- Limits: history cap, rate limits, worker liveness -----------------------------------------


async def _answer(store: SessionStore, redis: Redis, token: str, human: Message) -> Message:
    await redis.set(store.keys.lease(token), "me")
    reply = Message(source=Source.BOT, msg=f"re {human.msg}", reply_to=human.id)
    event = MessageEvent(id=reply.id, reply_to=human.id, msg=reply.msg, timestamp=reply.timestamp)
    assert await store.add_reply(token, reply, event, "me") is ReplyOutcome.STORED
    return reply


async def _index(redis: Redis, store: SessionStore, token: str) -> dict[str, bool]:
    index: Any = await redis.json().get(store.keys.session(token), "$.answered")
    return dict(index[0])


async def test_history_is_capped_dropping_whole_exchanges(redis_url: str, redis: Redis) -> None:
    store = SessionStore(redis, make_settings(redis_url, max_history_messages=4))
    session = await store.create("Ann")
    for n in range(3):
        human = await sessions.add_human_message(store, session.token, f"q{n}")
        assert human is not None
        await _answer(store, redis, session.token, human)
    stored = await sessions.messages(store, session.token)
    assert stored is not None
    assert [m.msg for m in stored] == ["q1", "re q1", "q2", "re q2"]

    # h3 pushes out q1; its reply, now first with no question, goes with it.
    await sessions.add_human_message(store, session.token, "q3")
    stored = await sessions.messages(store, session.token)
    assert stored is not None
    assert [m.msg for m in stored] == ["q2", "re q2", "q3"]


async def test_history_cap_keeps_unanswered_questions_over_their_old_replies(
    redis_url: str, redis: Redis
) -> None:
    store = SessionStore(redis, make_settings(redis_url, max_history_messages=3))
    session = await store.create("Ann")
    first = await sessions.add_human_message(store, session.token, "q0")
    assert first is not None
    later = [await sessions.add_human_message(store, session.token, f"q{n}") for n in (1, 2, 3)]
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["q1", "q2", "q3"]
    # The history's index holds the questions the capped history holds.
    assert {m.id for m in later if m} == set(await _index(redis, store, session.token))
    # A reply to a question that was dropped meanwhile is still stored within the cap, and a
    # retry of it finds it stored.
    reply = await _answer(store, redis, session.token, first)
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["q2", "q3", "re q0"]
    event = MessageEvent(id=reply.id, reply_to=first.id, msg=reply.msg, timestamp=reply.timestamp)
    assert await store.add_reply(session.token, reply, event, "me") is ReplyOutcome.ALREADY_ANSWERED
    assert later[1] is not None and later[2] is not None
    assert await _index(redis, store, session.token) == {
        later[1].id: False,
        later[2].id: False,
        first.id: True,
    }


async def test_no_cap_when_zero(redis_url: str, redis: Redis) -> None:
    store = SessionStore(redis, make_settings(redis_url, max_history_messages=0))
    session = await store.create("Ann")
    for n in range(30):
        await sessions.add_human_message(store, session.token, f"q{n}")
    stored = await sessions.messages(store, session.token)
    assert stored is not None and len(stored) == 30


async def test_the_duplicate_and_answered_checks_do_not_scan_the_history(
    store: SessionStore, redis: Redis
) -> None:
    """Their cost must not grow with the history (up to MAX_HISTORY_MESSAGES = 1000): each
    is a lookup in the document's index, not a JSONPath filter over `$.messages`."""
    session = await store.create("Ann")
    for n in range(20):
        human = await sessions.add_human_message(store, session.token, f"q{n}")
        assert human is not None
        await _answer(store, redis, session.token, human)
    async with monitored(redis) as commands:
        human = await sessions.add_human_message(store, session.token, "last")
        assert human is not None
        again = await store.queue_message(
            session.token, "last", rate_limited=False, message_id=human.id
        )
        await _answer(store, redis, session.token, human)
        reply = Message(source=Source.BOT, msg="again", reply_to=human.id)
        event = MessageEvent(id=reply.id, reply_to=human.id, msg="again", timestamp=reply.timestamp)
        repeated = await store.add_reply(session.token, reply, event, "me")
    assert isinstance(again, Queued) and repeated is ReplyOutcome.ALREADY_ANSWERED
    stored = await sessions.messages(store, session.token)
    assert stored is not None and len(stored) == 42
    scans = [c for c in commands if c.startswith("JSON.GET") and "$.messages[?" in c]
    assert scans == []


async def test_a_document_written_before_the_index_gets_it_from_its_history(
    store: SessionStore, redis: Redis
) -> None:
    session = await store.create("Ann")
    answered = await sessions.add_human_message(store, session.token, "q0")
    waiting = await sessions.add_human_message(store, session.token, "q1")
    assert answered is not None and waiting is not None
    await _answer(store, redis, session.token, answered)
    key = store.keys.session(session.token)
    await redis.json().delete(key, "$.answered")
    await redis.json().delete(key, "$.schema")

    again = await store.queue_message(
        session.token, "q0", rate_limited=False, message_id=answered.id
    )
    assert isinstance(again, Queued)
    assert await _index(redis, store, session.token) == {answered.id: True, waiting.id: False}
    reply = Message(source=Source.BOT, msg="again", reply_to=answered.id)
    event = MessageEvent(id=reply.id, reply_to=answered.id, msg="x", timestamp=reply.timestamp)
    assert await store.add_reply(session.token, reply, event, "me") is ReplyOutcome.ALREADY_ANSWERED
    await _answer(store, redis, session.token, waiting)
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["q0", "q1", "re q0", "re q1"]
    assert await redis.json().get(key, "$.schema") == [2]


async def test_session_rate_limit_refuses_without_writing(redis_url: str, redis: Redis) -> None:
    settings = make_settings(redis_url, rate_limit_session_messages=3, rate_limit_window_seconds=60)
    store = SessionStore(redis, settings)
    session = await store.create("Ann")
    results = [await store.queue_message(session.token, f"m{n}") for n in range(5)]
    assert [type(r).__name__ for r in results] == ["Queued"] * 3 + ["RateLimited"] * 2
    refused = results[-1]
    assert isinstance(refused, RateLimited)
    # 3 per 60 s: the next one is allowed 20 s after the first.
    assert 1 <= refused.retry_after <= 20
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["m0", "m1", "m2"]
    assert await redis.xlen(store.keys.requests_for(session.token)) == 3
    # Another session is not affected; add_human_message (used by tools) is never limited.
    other = await store.create("Bob")
    assert isinstance(await store.queue_message(other.token, "hi"), Queued)
    assert await sessions.add_human_message(store, session.token, "unlimited") is not None


async def test_address_rate_limit_spans_sessions(redis_url: str, redis: Redis) -> None:
    settings = make_settings(redis_url, rate_limit_address_messages=2, rate_limit_window_seconds=60)
    store = SessionStore(redis, settings)
    sessions = [await store.create(name) for name in ("A", "B", "C")]
    results = [await store.queue_message(s.token, "hi", address="192.0.2.7") for s in sessions]
    assert [type(r).__name__ for r in results] == ["Queued", "Queued", "RateLimited"]
    # The refusal by the address limit did not use up the session's own allowance.
    assert await redis.exists(store.keys.session_rate(sessions[2].token)) == 0
    assert isinstance(
        await store.queue_message(sessions[2].token, "hi", address="192.0.2.8"), Queued
    )


async def test_rate_limit_zero_means_none(redis_url: str, redis: Redis) -> None:
    settings = make_settings(
        redis_url,
        rate_limit_session_messages=0,
        rate_limit_address_messages=0,
        max_unanswered_messages=0,
    )
    store = SessionStore(redis, settings)
    session = await store.create("Ann")
    for _ in range(40):
        assert isinstance(await store.queue_message(session.token, "x", address="a"), Queued)
    assert await store.check_rate("http-token", "a", 0, 60) == 0
    assert await redis.keys(f"{settings.key_prefix}:rate:*") == []


async def test_check_rate_counts_and_answers_whole_seconds(store: SessionStore) -> None:
    answers = [await store.check_rate("http-token", "198.51.100.1", 2, 60) for _ in range(3)]
    assert answers[:2] == [0, 0]
    assert 1 <= answers[2] <= 30
    assert await store.check_rate("http-token", "198.51.100.2", 2, 60) == 0


async def test_queued_reports_whether_a_worker_is_alive(
    store: SessionStore, redis: Redis, settings: Settings
) -> None:
    session = await store.create("Ann")
    nobody = await store.queue_message(session.token, "anyone?")
    assert isinstance(nobody, Queued) and nobody.workers_alive is False
    stale_ms = int((time.time() - settings.worker_lease_seconds - 5) * 1000)
    await redis.zadd(store.keys.workers_alive, {"dead-worker": stale_ms})
    stale = await store.queue_message(session.token, "still?")
    assert isinstance(stale, Queued) and stale.workers_alive is False
    await redis.zadd(store.keys.workers_alive, {"live-worker": int(time.time() * 1000)})
    alive = await store.queue_message(session.token, "now?")
    assert isinstance(alive, Queued) and alive.workers_alive is True


async def test_a_stored_message_is_acked_even_when_the_steps_after_it_fail(
    store: SessionStore, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's index and the live-workers count sit in other slots and are written after
    the message is stored: their failure must not turn a stored message into an error (the
    client would send it again)."""
    session = await store.create("Ann", user_id="u-1")

    async def refused(*_: Any, **__: Any) -> Any:
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(store.index, "touch", refused)
    monkeypatch.setattr(store, "_count_workers", refused)
    queued = await store.queue_message(session.token, "kept")
    assert isinstance(queued, Queued)
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["kept"]


async def test_on_one_redis_the_address_limit_is_checked_in_the_messages_own_round_trip(
    redis_url: str, redis: Redis
) -> None:
    settings = make_settings(redis_url, rate_limit_address_messages=2)
    store = SessionStore(redis, settings)
    session = await store.create("Ann")
    assert isinstance(await store.queue_message(session.token, "a", address="192.0.2.9"), Queued)
    before = await command_calls(redis, "evalsha")  # the scripts are loaded now
    assert isinstance(await store.queue_message(session.token, "b"), Queued)
    unlimited = await command_calls(redis, "evalsha") - before
    before = await command_calls(redis, "evalsha")
    assert isinstance(await store.queue_message(session.token, "b", address="192.0.2.9"), Queued)
    assert await command_calls(redis, "evalsha") - before == unlimited  # no script call of its own
    refused = await store.queue_message(session.token, "c", address="192.0.2.9")
    assert isinstance(refused, RateLimited)
    assert await redis.exists(store.keys.rate("msg-address", "192.0.2.9")) == 1
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["a", "b", "b"]


async def test_the_address_limit_counts_attempts_the_session_refuses(
    redis_url: str, redis: Redis
) -> None:
    settings = make_settings(redis_url, rate_limit_address_messages=2, max_unanswered_messages=1)
    store = SessionStore(redis, settings)
    first, second = await store.create("Ann"), await store.create("Bob")
    assert isinstance(await store.queue_message(first.token, "a", address="192.0.2.9"), Queued)
    full = await store.queue_message(first.token, "b", address="192.0.2.9")
    assert isinstance(full, BacklogFull)
    refused = await store.queue_message(second.token, "c", address="192.0.2.9")
    assert isinstance(refused, RateLimited)
    assert await sessions.messages(store, second.token) == []


# --- Backlog cap, stream length, Redis's clock --------------------------------------------------


async def test_backlog_cap_refuses_and_writes_nothing(redis_url: str, redis: Redis) -> None:
    settings = make_settings(redis_url, max_unanswered_messages=3)
    store = SessionStore(redis, settings)
    session = await store.create("Ann")
    queued = [await store.queue_message(session.token, f"q{n}") for n in range(3)]
    assert all(isinstance(q, Queued) for q in queued)
    assert await store.queue_message(session.token, "one too many") == BacklogFull(3)
    stored = await sessions.messages(store, session.token)
    assert stored is not None and [m.msg for m in stored] == ["q0", "q1", "q2"]
    assert await redis.xlen(store.keys.requests_for(session.token)) == 3
    # An answer makes room for exactly one more.
    first = queued[0]
    assert isinstance(first, Queued)
    await _answer(store, redis, session.token, first.message)
    assert isinstance(await store.queue_message(session.token, "q3"), Queued)
    assert await store.queue_message(session.token, "q4") == BacklogFull(3)


async def test_the_request_stream_is_never_trimmed(redis_url: str, redis: Redis) -> None:
    """More entries than the old STREAM_MAXLEN (its minimum, 1000): none trimmed away unread."""
    store = SessionStore(redis, make_settings(redis_url, stream_maxlen=1000))
    session = await store.create("Ann")
    for n in range(1500):
        await sessions.add_human_message(store, session.token, f"m{n}")
    assert await redis.xlen(store.keys.requests_for(session.token)) == 1500


async def test_a_skewed_server_clock_does_not_stamp_messages_or_stops(
    store: SessionStore, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    skewed = datetime.now(UTC) - timedelta(hours=1)
    monkeypatch.setattr(core.models, "utcnow", lambda: skewed)
    monkeypatch.setattr(core.store, "utcnow", lambda: skewed, raising=False)
    session = await store.create("Ann")
    queued = await store.queue_message(session.token, "what time is it?")
    await store.request_stop(session.token)
    seconds, micros = await redis.time()
    redis_now = datetime.fromtimestamp(seconds + micros / 1e6, UTC)
    assert isinstance(queued, Queued)
    stored, stopped_at = await store.messages_and_stop(session.token)
    assert stored is not None and stopped_at is not None
    for stamp in (queued.message.timestamp, stored[0].timestamp, stopped_at):
        assert abs((stamp - redis_now).total_seconds()) < 60


# --- One round trip per step of the worker (issue 12) -------------------------------------------


async def _queued_entry(store: SessionStore, redis: Redis, token: str) -> tuple[Message, str]:
    """A human message, and its request-stream entry read by a consumer (so it is pending)."""
    stream = store.keys.requests_for(token)
    await redis.xgroup_create(stream, store.keys.group, id="0", mkstream=True)
    human = await sessions.add_human_message(store, token, "q")
    assert human is not None
    read: Any = await redis.xreadgroup(store.keys.group, "c", {stream: ">"})
    return human, read[0][1][0][0]


def _bot_reply(human: Message) -> tuple[Message, MessageEvent]:
    message = Message(source=Source.BOT, msg="a", reply_to=human.id)
    return message, MessageEvent(
        id=message.id, reply_to=human.id, msg="a", timestamp=message.timestamp
    )


@pytest.mark.parametrize("outcome", [ReplyOutcome.STORED, ReplyOutcome.ALREADY_ANSWERED])
async def test_a_reply_that_finishes_its_entry_releases_the_lease_and_deletes_the_entry(
    store: SessionStore, redis: Redis, outcome: ReplyOutcome
) -> None:
    session = await store.create("Ann")
    human, entry = await _queued_entry(store, redis, session.token)
    lease = store.keys.lease(session.token)
    await redis.set(lease, "me")
    if outcome is ReplyOutcome.ALREADY_ANSWERED:
        assert await store.add_reply(session.token, *_bot_reply(human), "me") is ReplyOutcome.STORED

    stored = await store.add_reply(session.token, *_bot_reply(human), "me", finish=entry)

    assert stored is outcome
    assert await redis.exists(lease, store.keys.attempts(session.token, human.id)) == 0
    stream = store.keys.requests_for(session.token)
    assert await redis.xlen(stream) == 0
    pending: Any = await redis.xpending(stream, store.keys.group)
    assert pending["pending"] == 0


async def test_a_reply_after_the_lease_was_lost_leaves_the_entry_to_the_new_holder(
    store: SessionStore, redis: Redis
) -> None:
    session = await store.create("Ann")
    human, entry = await _queued_entry(store, redis, session.token)
    lease = store.keys.lease(session.token)
    await redis.set(lease, "the-new-holder")

    stored = await store.add_reply(session.token, *_bot_reply(human), "me", finish=entry)

    assert stored is ReplyOutcome.LEASE_LOST
    assert await redis.get(lease) == "the-new-holder"
    stream = store.keys.requests_for(session.token)
    assert await redis.xlen(stream) == 1
    pending: Any = await redis.xpending(stream, store.keys.group)
    assert pending["pending"] == 1


async def test_a_reply_to_a_deleted_session_still_finishes_its_entry(
    store: SessionStore, redis: Redis
) -> None:
    session = await store.create("Ann")
    human, entry = await _queued_entry(store, redis, session.token)
    await redis.set(store.keys.lease(session.token), "me")
    await redis.delete(store.keys.session(session.token))

    stored = await store.add_reply(session.token, *_bot_reply(human), "me", finish=entry)

    assert stored is ReplyOutcome.SESSION_GONE
    assert await redis.xlen(store.keys.requests_for(session.token)) == 0
    assert await redis.exists(store.keys.lease(session.token)) == 0


async def test_reading_a_turn_counts_the_expected_messages_attempt_in_the_same_step(
    store: SessionStore, redis: Redis, settings: Settings
) -> None:
    session = await store.create("Ann")
    human = await sessions.add_human_message(store, session.token, "q")
    assert human is not None
    await store.request_stop(session.token)

    first = await store.recent_messages(session.token, 10, attempt=human.id)
    second = await store.recent_messages(session.token, 10, attempt=human.id)
    uncounted = await store.recent_messages(session.token, 10)

    assert first is not None and second is not None and uncounted is not None
    assert [m.id for m in first.messages] == [human.id]
    assert first.stopped_at is not None and first.complete
    assert (first.attempts, second.attempts, uncounted.attempts) == (1, 2, None)
    attempts = store.keys.attempts(session.token, human.id)
    assert await redis.get(attempts) == "2"
    assert 0 < await redis.ttl(attempts) <= settings.session_ttl_seconds


async def test_reading_a_turn_of_a_missing_session_counts_nothing(
    store: SessionStore, redis: Redis
) -> None:
    message_id, token = new_id(), new_id()
    assert await store.recent_messages(token, 10, attempt=message_id) is None
    assert await redis.exists(store.keys.attempts(token, message_id)) == 0


async def asked(store: SessionStore) -> tuple[str, Message, str]:
    """A session with one question: its token, the question, and its lease's key."""
    session = await store.create("Ann")
    human = await sessions.add_human_message(store, session.token, "q")
    assert human is not None
    return session.token, human, store.keys.lease(session.token)


async def test_reading_a_turn_takes_the_lease_in_the_same_step(
    store: SessionStore, redis: Redis
) -> None:
    token, human, key = await asked(store)

    recent = await store.recent_messages(token, 10, attempt=human.id, lease=(key, "me", 5000))
    again = await store.recent_messages(token, 10, lease=(key, "me", 5000))  # a retry

    assert recent is not None and [m.id for m in recent.messages] == [human.id]
    assert again is not None  # its own lease is not busy
    assert await redis.get(key) == "me"
    assert 0 < await redis.pttl(key) <= 5000


async def test_reading_a_turn_whose_lease_another_holds_reads_and_counts_nothing(
    store: SessionStore, redis: Redis
) -> None:
    token, human, key = await asked(store)
    await redis.set(key, "other", px=60_000)

    with pytest.raises(LeaseBusy):
        await store.recent_messages(token, 10, attempt=human.id, lease=(key, "me", 5000))

    assert await redis.get(key) == "other"
    assert await redis.exists(store.keys.attempts(token, human.id)) == 0


async def test_reading_a_turn_of_a_missing_session_takes_no_lease(
    store: SessionStore, redis: Redis
) -> None:
    token = new_id()
    key = store.keys.lease(token)
    assert await store.recent_messages(token, 10, lease=(key, "me", 5000)) is None
    assert await redis.exists(key) == 0


async def test_a_replys_last_token_event_goes_out_alone_when_the_reply_is_not_stored(
    store: SessionStore, redis: Redis
) -> None:
    """A reply that finds its message answered already is not stored and announces nothing,
    but the text its sockets saw streaming is still ended by the last `token` event."""
    session = await store.create("Ann")
    human, _ = await _queued_entry(store, redis, session.token)
    message, event = _bot_reply(human)
    rest = core.models.DeltaEvent(id=message.id, reply_to=human.id, delta="the rest")
    await redis.set(store.keys.lease(session.token), "me")
    assert await store.add_reply(session.token, message, event, "me") is ReplyOutcome.STORED
    async with redis.pubsub() as pubsub:
        await pubsub.ssubscribe(store.keys.events(session.token))
        await pubsub.get_message(timeout=1)
        again = await store.add_reply(session.token, message, event, "me", delta=rest)
        heard = await pubsub.get_message(timeout=2)
        late = await pubsub.get_message(timeout=0.2)
    assert again is ReplyOutcome.ALREADY_ANSWERED
    assert heard is not None and json.loads(heard["data"])["delta"] == "the rest"
    assert late is None


async def test_a_replys_last_token_event_goes_first_and_only_with_the_lease(
    store: SessionStore, redis: Redis
) -> None:
    """The rest of the text and the reply's own event share one SPUBLISH, the `token` event
    first (server/hub.py splits the message at its newline)."""
    session = await store.create("Ann")
    human, _ = await _queued_entry(store, redis, session.token)
    message, event = _bot_reply(human)
    rest = core.models.DeltaEvent(id=message.id, reply_to=human.id, delta="the rest")
    await redis.set(store.keys.lease(session.token), "me")
    async with redis.pubsub() as pubsub:
        await pubsub.ssubscribe(store.keys.events(session.token))
        await pubsub.get_message(timeout=1)
        lost = await store.add_reply(session.token, message, event, "other", delta=rest)
        stored = await store.add_reply(session.token, message, event, "me", delta=rest)
        heard = await pubsub.get_message(timeout=2)
        late = await pubsub.get_message(timeout=0.2)
    assert (lost, stored) == (ReplyOutcome.LEASE_LOST, ReplyOutcome.STORED)
    assert heard is not None
    events = [json.loads(part) for part in heard["data"].split("\n")]
    assert [e["type"] for e in events] == ["token", "message"]
    assert events[0]["delta"] == "the rest"
    assert late is None
