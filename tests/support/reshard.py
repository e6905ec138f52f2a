"""Moving a slot from one master of an EmbeddedCluster to another, as `redis-cli --cluster
reshard` does, for the tests that reshard under load (the service must follow MOVED and ASK
and re-subscribe the slot's sharded channels on the new master)."""

from __future__ import annotations

from launcher.redis_cluster import LOCAL, EmbeddedCluster, slot_ranges
from launcher.redis_server import EmbeddedRedis

BATCH = 20  # keys per MIGRATE: small, so clients meet ASK for a while during the move


def built_owner(cluster: EmbeddedCluster, slot: int) -> EmbeddedRedis:
    """The master that serves `slot` as the cluster was built (contiguous even ranges)."""
    ranges = slot_ranges(len(cluster.masters))
    for master, (first, last) in zip(cluster.masters, ranges, strict=True):
        if first <= slot <= last:
            return master
    raise ValueError(f"slot {slot} is in no range")


def migrate_slot(
    cluster: EmbeddedCluster, slot: int, source: EmbeddedRedis, target: EmbeddedRedis
) -> int:
    """Move `slot` and its keys from `source` to `target`; returns how many keys moved.

    IMPORTING on the target and MIGRATING on the source first (from then on a key not found
    on the source gets ASK), the keys in batches (MIGRATE, with AUTH2 when the nodes have a
    password), then SETSLOT NODE on every master, the target first: once it owns the slot, a
    client that MOVED sends there is served."""
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    auth = ["AUTH2", "default", cluster.password] if cluster.password else []
    moved = 0
    while batch := cluster.command(source, "CLUSTER", "GETKEYSINSLOT", slot, BATCH):
        cluster.command(source, "MIGRATE", LOCAL, target.port, "", 0, 5000, *auth, "KEYS", *batch)
        moved += len(batch)
    for node in [target, *(m for m in cluster.masters if m is not target)]:
        cluster.command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    return moved
