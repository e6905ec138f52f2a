"""The per-process fan-out from Redis Pub/Sub to sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from core.keys import Keys
from core.models import (
    AckEvent,
    ErrorCode,
    ErrorEvent,
    ack_message_id,
    dump_event,
    new_id,
)
from core.redis import create_redis
from launcher.redis_server import EmbeddedRedis, free_port
from server.hub import RESYNC_CODE, CloseSocket, EventHub, Outbox, OutboxOverflow
from tests.conftest import make_settings


@pytest.fixture
async def hub(redis: Redis, settings_keys: Keys) -> AsyncIterator[EventHub]:
    events = EventHub(redis, settings_keys)
    await events.start()
    yield events
    await events.aclose()


@pytest.fixture
def settings_keys(redis: Redis) -> Keys:
    return Keys(f"hub-{new_id()[:8]}")


async def test_one_channel_per_session_while_a_socket_is_open(
    hub: EventHub, redis: Redis, settings_keys: Keys
) -> None:
    token, other = new_id(), new_id()
    async with hub.subscribe(token) as tab1, hub.subscribe(token) as tab2, hub.subscribe(other):
        assert hub.channels == 2
        await redis.spublish(settings_keys.events(token), "hello")
        assert await asyncio.wait_for(tab1.get(), 2) == "hello"
        assert await asyncio.wait_for(tab2.get(), 2) == "hello"
    assert hub.channels == 0


async def test_events_sent_together_reach_every_socket_as_frames_in_order(
    hub: EventHub, redis: Redis, settings_keys: Keys
) -> None:
    """add_reply.lua sends a reply's last `token` event and its `message` event in one
    message, joined by a newline: each socket gets them as two frames, in that order."""
    token = new_id()
    async with hub.subscribe(token) as tab1, hub.subscribe(token) as tab2:
        await redis.spublish(settings_keys.events(token), '{"type":"token"}\n{"type":"message"}')
        for tab in (tab1, tab2):
            frames = [await asyncio.wait_for(tab.get(), 2) for _ in range(2)]
            assert frames == ['{"type":"token"}', '{"type":"message"}']


async def test_a_failed_subscribe_leaves_nothing_behind(
    hub: EventHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*_: object) -> None:
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(hub._subscriber, "subscribe", refuse)
    with pytest.raises(RedisConnectionError):
        async with hub.subscribe(new_id()):
            pass
    assert hub.channels == 0


async def test_a_slow_socket_overflows_instead_of_growing_without_bound(
    redis: Redis, settings_keys: Keys
) -> None:
    hub = EventHub(redis, settings_keys, outbox_max_bytes=3000)
    await hub.start()
    token = new_id()
    try:
        async with hub.subscribe(token) as slow:
            for n in range(5):
                await redis.spublish(settings_keys.events(token), str(n) * 1000)
            await asyncio.sleep(0.3)
            assert slow.overflowed
    finally:
        await hub.aclose()


async def test_subscription_hands_frames_out_in_order_and_wakes_a_waiting_sender() -> None:
    outbox = Outbox(max_bytes=10_000)
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)  # the sender now waits on an empty outbox
    outbox.put("first")
    outbox.put(CloseSocket(1000, "bye"))
    assert await asyncio.wait_for(waiting, timeout=5) == "first"
    assert await outbox.get() == CloseSocket(1000, "bye")


async def test_outbox_overflow_drops_the_rest_and_raises() -> None:
    outbox = Outbox(max_bytes=120)  # two one-character strings take 50 bytes each
    for frame in ("a", "b", "c"):
        outbox.put(frame)
    assert outbox.overflowed
    assert outbox.queued_bytes == 0  # what was queued is freed at once
    with pytest.raises(OutboxOverflow):
        await outbox.get()


async def test_the_outbox_counts_bytes_not_frames() -> None:
    outbox = Outbox(max_bytes=1024 * 1024)
    outbox.put("x" * 300_000)  # about 300 kB
    outbox.put("x" * 300_000 + "\U0001f600")  # one astral character: 4 bytes a character
    assert outbox.overflowed


async def test_the_outbox_gives_back_what_was_sent() -> None:
    outbox = Outbox(max_bytes=100_000)
    for _ in range(100):
        outbox.put("y" * 10_000)
        assert await outbox.get() == "y" * 10_000
    assert not outbox.overflowed
    assert outbox.queued_bytes == 0


def test_an_ack_is_recognised_by_its_dumped_form() -> None:
    """The outbox spots acks by their first bytes: this breaks if AckEvent's fields move."""
    message_id = new_id()
    ack = AckEvent(id=message_id, msg="hi", timestamp=datetime.now(UTC), client_id="c")
    assert ack_message_id(dump_event(ack)) == message_id
    other = ErrorEvent(code=ErrorCode.BAD_REQUEST, detail=f'"id":"{message_id}"')
    assert ack_message_id(dump_event(other)) is None


async def test_sockets_are_told_to_resync_after_redis_comes_back(tmp_path: Path) -> None:
    port = free_port()
    keys = Keys("resync")
    with EmbeddedRedis(port, tmp_path) as server:
        redis = create_redis(make_settings(server.url))
        hub = EventHub(redis, keys)
        await hub.start()
        try:
            async with hub.subscribe(new_id()) as socket:
                server.kill()
                await asyncio.sleep(0.5)
                server.start()
                frame = await asyncio.wait_for(socket.get(), 20)
        finally:
            await hub.aclose()
            await redis.aclose()
    assert frame == CloseSocket(RESYNC_CODE, "Events may have been missed; reconnect")


def _ack(message_id: str) -> str:
    return f'{{"type":"ack","id":"{message_id}","msg":"m","timestamp":"2026-01-01T00:00:00Z"}}'


async def test_a_frame_put_after_an_ack_waits_for_it() -> None:
    outbox = Outbox(100_000)
    first, second = new_id(), new_id()
    outbox.put_after_ack(second, "notice for second")
    outbox.put(_ack(first))
    outbox.put(_ack(second))
    outbox.put("token event")
    frames = [await outbox.get() for _ in range(4)]
    assert frames == [_ack(first), _ack(second), "notice for second", "token event"]


async def test_a_frame_put_after_its_ack_went_out_is_sent_at_once() -> None:
    outbox = Outbox(100_000)
    message_id = new_id()
    outbox.put(_ack(message_id))
    assert await outbox.get() == _ack(message_id)
    outbox.put_after_ack(message_id, "late notice")
    assert await outbox.get() == "late notice"


def test_an_idle_socket_has_no_ack_bookkeeping() -> None:
    outbox = Outbox(100_000)
    outbox.put("token event")
    assert outbox._after_ack is None
    assert outbox._acked is None


async def test_frames_waiting_for_lost_acks_are_bounded() -> None:
    outbox = Outbox(100_000)
    for _ in range(Outbox.MAX_HELD + 50):
        outbox.put_after_ack(new_id(), "never")
    assert outbox._after_ack is not None
    assert len(outbox._after_ack) == Outbox.MAX_HELD
