"""core/subscriber.py on real Redis: sharded channels on one Redis and across a cluster's
nodes, and what it does when a node's connection is lost or a channel's slot moves (a node
that unsubscribes a channel by itself is a gap in the events, like a lost connection)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterError

from core.keys import Keys
from core.models import new_id
from core.redis import AnyRedis, connect_redis, create_redis
from core.subscriber import ShardedSubscriber
from launcher.redis_cluster import EmbeddedCluster, free_port_range
from launcher.redis_server import EmbeddedRedis, free_port
from tests.conftest import make_settings
from tests.support.reshard import built_owner, migrate_slot


class Heard:
    """What a subscriber handed over: messages by channel, and how often it lost them."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.losses = 0

    def message(self, channel: str, data: str) -> None:
        self.messages.put_nowait((channel, data))

    def lost(self) -> None:
        self.losses += 1


@contextlib.asynccontextmanager
async def subscriber(redis: AnyRedis, heard: Heard) -> AsyncIterator[ShardedSubscriber]:
    listening = ShardedSubscriber(redis, heard.message, heard.lost)
    try:
        yield listening
    finally:
        await listening.aclose()


async def published_until_heard(redis: AnyRedis, heard: Heard, channel: str) -> tuple[str, str]:
    """SPUBLISH until the subscriber hands the message over (it may be re-subscribing)."""
    async with asyncio.timeout(20):
        while True:
            await redis.spublish(channel, "hello")
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(heard.messages.get(), 0.2)


async def test_channels_on_every_master_are_heard_as_soon_as_subscribed(
    redis_cluster: EmbeddedCluster,
) -> None:
    redis = await connect_redis(make_settings(redis_cluster.url))
    keys = Keys(f"sub-{new_id()[:8]}", 24)
    heard = Heard()
    try:
        async with subscriber(redis, heard) as listening:
            channels = keys.control_channels  # 24 slots, 8 on each master
            await listening.subscribe(*channels)
            for channel in channels:  # no sleep: subscribe returned once Redis confirmed
                await redis.spublish(channel, channel)
            got = [await asyncio.wait_for(heard.messages.get(), 5) for _ in channels]
    finally:
        await redis.aclose()
    assert sorted(got) == sorted((channel, channel) for channel in channels)
    assert heard.losses == 0


async def test_a_restarted_redis_is_reported_and_the_channels_come_back(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as server:
        redis = create_redis(make_settings(server.url))
        heard = Heard()
        try:
            async with subscriber(redis, heard) as listening:
                await listening.subscribe("{a}:events:1")
                server.kill()
                await asyncio.sleep(0.5)
                server.start()
                got = await published_until_heard(redis, heard, "{a}:events:1")
        finally:
            await redis.aclose()
    assert got == ("{a}:events:1", "hello")
    assert heard.losses >= 1


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    """A cluster of the test's own: the test moves one of its slots."""
    with EmbeddedCluster(free_port_range(3), tmp_path / "redis", password="pw") as cluster:
        yield cluster


async def test_a_channel_whose_slot_moves_is_subscribed_again(
    own_cluster: EmbeddedCluster,
) -> None:
    """Redis sends SUNSUBSCRIBE to the subscribers of a slot that moved. The subscriber must
    tell its owner (who makes the sockets resync) and subscribe on the new master: before,
    it ignored the message and the channel stayed silent for good."""
    redis = await connect_redis(make_settings(own_cluster.url))
    assert isinstance(redis, RedisCluster)
    await redis.initialize()
    got: list[str] = []
    lost = asyncio.Event()
    moved: list[str] = []

    def on_moved(channel: str) -> None:
        moved.append(channel)
        lost.set()

    subscriber = ShardedSubscriber(redis, lambda _c, data: got.append(data), lambda: None, on_moved)
    channel = "test:{moving}:events"
    try:
        await subscriber.subscribe(channel)
        slot = key_slot(channel.encode())
        source = built_owner(own_cluster, slot)
        target = next(m for m in own_cluster.masters if m is not source)
        await asyncio.to_thread(migrate_slot, own_cluster, slot, source, target)
        await asyncio.wait_for(lost.wait(), 10)
        # Published on the new master (the client follows MOVED) and heard there. While the
        # nodes still disagree on the slot's owner, a publish can bounce between them until
        # redis-py gives up ("TTL exhausted"): it is sent again, as the worker would.
        async with asyncio.timeout(10):
            while not got:
                with contextlib.suppress(ClusterError):
                    await redis.spublish(channel, "after the move")
                await asyncio.sleep(0.1)
        assert got[0] == "after the move"
        assert moved == [channel]  # that channel only, not a lost connection
    finally:
        await subscriber.aclose()
        await redis.aclose()


async def test_unsubscribing_while_a_node_is_lost_does_not_fail(
    own_cluster: EmbeddedCluster,
) -> None:
    """`unsubscribe` walks the nodes while a reader may drop one (its connection lost): it
    walked the live dict and failed with "dictionary changed size during iteration"."""
    redis = await connect_redis(make_settings(own_cluster.url))
    assert isinstance(redis, RedisCluster)
    await redis.initialize()
    subscriber = ShardedSubscriber(redis, lambda _c, _d: None, lambda: None)
    # Channels on every master, so there are several nodes to walk.
    channels = [f"test:{{c{n}}}:events" for n in range(12)]
    try:
        await subscriber.subscribe(*channels)
        nodes = list(subscriber._nodes.values())
        assert len(nodes) == 3
        # A reader's loss removes its node while unsubscribe is between two awaits.
        original = nodes[0].pubsub.sunsubscribe

        async def slow_sunsubscribe(*args: str) -> None:
            subscriber._nodes.pop(nodes[1].name, None)
            await original(*args)

        nodes[0].pubsub.sunsubscribe = slow_sunsubscribe  # type: ignore[method-assign,assignment]
        for channel in channels:
            await subscriber.unsubscribe(channel)
        await nodes[1].aclose()  # the reader would have, after its loss
    finally:
        await subscriber.aclose()
        await redis.aclose()
