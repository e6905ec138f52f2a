"""The key layout that shards (core/keys.py): partitions, their hash tags and slots."""

from __future__ import annotations

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from core.keys import Keys, partition_tags
from core.models import new_id


@pytest.mark.parametrize("partitions", [1, 3, 24, 48])
def test_each_partition_tag_falls_in_its_own_equal_slot_range(partitions: int) -> None:
    keys = Keys("chat", partitions)
    slots = [key_slot(stream.encode()) for stream in keys.streams]
    for index, slot in enumerate(slots):
        low = index * REDIS_CLUSTER_HASH_SLOTS // partitions
        high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // partitions
        assert low <= slot < high
    assert len(set(partition_tags(partitions))) == partitions


def test_three_masters_with_even_slot_ranges_get_an_even_share_of_partitions() -> None:
    keys = Keys("chat", 24)
    third = REDIS_CLUSTER_HASH_SLOTS // 3
    shares = [0, 0, 0]
    for stream in keys.streams:
        shares[min(2, key_slot(stream.encode()) // (third + 1))] += 1
    assert shares == [8, 8, 8]


def test_every_key_and_channel_of_a_session_is_in_its_partitions_slot() -> None:
    keys = Keys("chat", 24)
    token = new_id()
    names = [
        keys.session(token),
        keys.events(token),
        keys.lease(token),
        keys.stop(token),
        keys.sockets(token),
        keys.session_rate(token),
        keys.attempts(token, new_id()),
        keys.requests_for(token),
        keys.control_for(token),
    ]
    assert len({key_slot(name.encode()) for name in names}) == 1


def test_sessions_spread_over_every_partition() -> None:
    keys = Keys("chat", 24)
    counts = [0] * 24
    for _ in range(2400):
        counts[keys.partition(new_id())] += 1
    assert min(counts) > 50  # 100 expected each


def test_a_key_of_a_session_is_told_from_the_others_by_its_shape() -> None:
    keys = Keys("my.app", 24)
    token = new_id()
    assert keys.kind_of(keys.session(token)) == "session"
    assert keys.kind_of(keys.sockets(token)) == "sockets"
    assert keys.kind_of(keys.session_rate(token)) == "rate"
    assert keys.kind_of(keys.rate("msg-address", "192.0.2.1")) is None
    assert keys.kind_of(keys.user("u1")) is None
    assert keys.kind_of(Keys("other", 24).session(token)) is None
