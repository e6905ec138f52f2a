"""core/subscriber.py on real Redis: sharded channels on one Redis and across a cluster's
nodes, and what it does when a node's connection is lost or a channel's slot moves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from redis.crc import key_slot

from core.keys import Keys
from core.models import new_id
from core.redis import AnyRedis, connect_redis, create_redis
from core.subscriber import ShardedSubscriber
from launcher.redis_cluster import EmbeddedCluster
from launcher.redis_server import EmbeddedRedis, free_port
from tests.conftest import make_settings


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


async def test_a_channel_whose_slot_moves_to_another_master_is_followed(
    redis_cluster: EmbeddedCluster,
) -> None:
    """Redis tells a subscriber of a moved slot with a SUNSUBSCRIBE it did not ask for, on a
    connection that stays open: missed, the channel would fall silent for good."""
    taken = {key_slot(stream.encode()) for stream in Keys().streams}
    channel = f"{{move-{new_id()}}}:events"
    while key_slot(channel.encode()) in taken:  # an empty slot no other test uses
        channel = f"{{move-{new_id()}}}:events"
    slot = key_slot(channel.encode())
    redis = await connect_redis(make_settings(redis_cluster.url))
    heard = Heard()
    try:
        async with subscriber(redis, heard) as listening:
            await listening.subscribe(channel)
            source, target = _owner_and_other(redis_cluster, slot)
            _move_empty_slot(redis_cluster, slot, target)
            try:
                got = await published_until_heard(redis, heard, channel)
            finally:
                _move_empty_slot(redis_cluster, slot, source)
    finally:
        await redis.aclose()
    assert got == (channel, "hello")
    assert heard.losses == 1


def _owner_and_other(cluster: EmbeddedCluster, slot: int) -> tuple[EmbeddedRedis, EmbeddedRedis]:
    """The master serving `slot` (CLUSTER SLOTS: start, end, [host, port, id], replicas...)
    and another master."""
    for first, last, (_host, port, *_), *_replicas in cluster.command(
        cluster.masters[0], "CLUSTER", "SLOTS"
    ):
        if first <= slot <= last:
            owner = next(m for m in cluster.masters if m.port == int(port))
            return owner, next(m for m in cluster.masters if m is not owner)
    raise AssertionError(f"slot {slot} is not served")


def _move_empty_slot(cluster: EmbeddedCluster, slot: int, target: EmbeddedRedis) -> None:
    """Assign a slot that holds no key to `target`: on it first (its epoch wins), then on
    the others."""
    target_id = cluster.node_id(target)
    for node in [target, *(m for m in cluster.masters if m is not target)]:
        cluster.command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    cluster.wait_until_ready()
