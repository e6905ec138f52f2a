"""ShardedSubscriber on a Redis Cluster whose slots move: a node that unsubscribes a channel
by itself (its slot went to another master) is a gap in the events, like a lost connection."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from core.redis import connect_redis
from core.subscriber import ShardedSubscriber
from launcher.redis_cluster import EmbeddedCluster, free_port_range
from tests.conftest import make_settings
from tests.support.reshard import built_owner, migrate_slot


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
        # Published on the new master (the client follows MOVED) and heard there.
        async with asyncio.timeout(10):
            while not got:
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
