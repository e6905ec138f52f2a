"""The per-process fan-out from Redis Pub/Sub to sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from core.keys import Keys
from core.models import new_id
from core.redis import create_redis
from launcher.redis_server import EmbeddedRedis, free_port
from server.hub import RESYNC_CODE, CloseSocket, EventHub, Subscription
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
        await redis.publish(settings_keys.events(token), "hello")
        assert await asyncio.wait_for(tab1.get(), 2) == "hello"
        assert await asyncio.wait_for(tab2.get(), 2) == "hello"
    assert hub.channels == 0


async def test_a_failed_subscribe_leaves_nothing_behind(
    hub: EventHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*_: object) -> None:
        raise RedisConnectionError("Redis went away")

    assert hub._pubsub is not None
    monkeypatch.setattr(hub._pubsub, "subscribe", refuse)
    with pytest.raises(RedisConnectionError):
        async with hub.subscribe(new_id()):
            pass
    assert hub.channels == 0


async def test_a_slow_socket_overflows_instead_of_growing_without_bound(
    redis: Redis, settings_keys: Keys
) -> None:
    hub = EventHub(redis, settings_keys, max_pending=3)
    await hub.start()
    token = new_id()
    try:
        async with hub.subscribe(token) as slow:
            for n in range(5):
                await redis.publish(settings_keys.events(token), str(n))
            await asyncio.sleep(0.3)
            assert slow.overflowed
    finally:
        await hub.aclose()


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
    outbox = Subscription(100)
    first, second = new_id(), new_id()
    outbox.put_after_ack(second, "notice for second")
    outbox.put(_ack(first))
    outbox.put(_ack(second))
    outbox.put("token event")
    frames = [await outbox.get() for _ in range(4)]
    assert frames == [_ack(first), _ack(second), "notice for second", "token event"]


async def test_a_frame_put_after_its_ack_went_out_is_sent_at_once() -> None:
    outbox = Subscription(100)
    message_id = new_id()
    outbox.put(_ack(message_id))
    assert await outbox.get() == _ack(message_id)
    outbox.put_after_ack(message_id, "late notice")
    assert await outbox.get() == "late notice"


async def test_frames_waiting_for_lost_acks_are_bounded() -> None:
    outbox = Subscription(100)
    for _ in range(Subscription.MAX_HELD + 50):
        outbox.put_after_ack(new_id(), "never")
    assert len(outbox._after_ack) == Subscription.MAX_HELD
