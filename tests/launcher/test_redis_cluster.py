"""The local Redis Cluster (launcher/redis_cluster.py): real redis-server processes, a real
cluster client, nothing mocked."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from bench.support import Child
from core.config import Settings
from launcher.__main__ import cluster_data_dir, redis_units
from launcher.redis_cluster import SLOTS, EmbeddedCluster, free_port_range
from launcher.redis_server import (
    PASSWORD_FILE,
    EmbeddedRedis,
    EmbeddedRedisError,
    free_port,
    port_in_use,
)
from launcher.supervisor import Supervisor

# Stores a value and queues it on a stream in one step: two keys, hence one hash tag.
STORE_AND_QUEUE = """
redis.call('SET', KEYS[1], ARGV[1])
return redis.call('XADD', KEYS[2], '*', 'value', redis.call('GET', KEYS[1]))
"""


@asynccontextmanager
async def cluster_client(cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


def owner(cluster: EmbeddedCluster, key: str) -> EmbeddedRedis:
    """The master holding the key, asked of the nodes themselves (not computed)."""
    slot = key_slot(key.encode())
    holders = [
        m for m in cluster.masters if cluster.command(m, "CLUSTER", "COUNTKEYSINSLOT", slot) > 0
    ]
    assert len(holders) == 1, holders
    return holders[0]


def owned_ranges(cluster: EmbeddedCluster) -> dict[int, list[tuple[int, int]]]:
    """Port -> slot ranges, from the first node's CLUSTER NODES."""
    listing = str(cluster.command(cluster.nodes[0], "CLUSTER", "NODES"))
    ranges: dict[int, list[tuple[int, int]]] = {}
    for line in listing.splitlines():
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for part in fields[8:]:
            first, _, last = part.partition("-")
            ranges.setdefault(port, []).append((int(first), int(last or first)))
    return ranges


async def test_three_masters_serve_json_streams_scripts_and_sharded_pubsub(
    redis_cluster: EmbeddedCluster,
) -> None:
    tag = f"{{t-{uuid.uuid4().hex[:8]}}}"
    async with cluster_client(redis_cluster) as rc:
        assert len(rc.get_primaries()) == 3
        await rc.json().set(f"{tag}:doc", "$", {"messages": []})
        await rc.json().arrappend(f"{tag}:doc", "$.messages", "hello")
        assert await rc.json().get(f"{tag}:doc", "$.messages") == [["hello"]]
        await rc.xadd(f"{tag}:stream", {"value": "first"})
        await rc.eval(STORE_AND_QUEUE, 2, f"{tag}:last", f"{tag}:stream", "second")
        entries = await rc.xrange(f"{tag}:stream")
        assert [fields["value"] for _, fields in entries or [] if fields] == ["first", "second"]
        # Without a shared tag the same script is refused: the keys really are spread out.
        apart = ["a", "b"]
        assert key_slot(b"a") != key_slot(b"b")
        with pytest.raises(RedisClusterException, match="same"):
            await rc.eval(STORE_AND_QUEUE, 2, *apart, "x")

        pubsub = rc.pubsub()
        await pubsub.ssubscribe(f"{tag}:events")
        assert await rc.spublish(f"{tag}:events", "token") == 1
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.5)
        await pubsub.aclose()
    assert message is not None and message["data"] == "token"


def test_the_slots_are_split_evenly_in_one_range_per_master(
    redis_cluster: EmbeddedCluster,
) -> None:
    ranges = owned_ranges(redis_cluster)
    assert sorted(ranges) == [m.port for m in redis_cluster.masters]
    assert all(len(owned) == 1 for owned in ranges.values()), ranges
    spans = sorted(owned[0] for owned in ranges.values())
    assert spans[0][0] == 0 and spans[-1][1] == SLOTS - 1
    assert all(prev[1] + 1 == nxt[0] for prev, nxt in itertools.pairwise(spans))
    sizes = [last - first + 1 for first, last in spans]
    assert max(sizes) - min(sizes) <= 1, sizes


async def test_every_master_has_a_connected_replica_behind_the_password(tmp_path: Path) -> None:
    cluster = EmbeddedCluster(free_port_range(6), tmp_path, replicas=1, password="pw-cluster")
    with cluster:
        for replica in cluster.replicas:
            master = cluster.master_of(replica)
            with cluster.client(master) as conn:
                info = conn.info("replication")
            assert info["role"] == "master" and info["connected_slaves"] == 1
            assert info["slave0"]["port"] == replica.port and info["slave0"]["state"] == "online"
            with cluster.client(replica) as conn:
                following = conn.info("replication")
            assert following["master_port"] == master.port
            assert following["master_link_status"] == "up"
        async with cluster_client(cluster) as rc:
            await rc.set("{r}:copied", "yes")
        holder = owner(cluster, "{r}:copied")
        # WAIT: the write reached the replica (which logged in with masterauth).
        assert cluster.command(holder, "WAIT", 1, 2000) == 1


async def test_a_killed_master_restarted_rejoins_with_its_data(tmp_path: Path) -> None:
    with EmbeddedCluster(free_port_range(3), tmp_path) as cluster:
        async with cluster_client(cluster) as rc:
            await rc.set("{k}:kept", "before the crash")
        master = owner(cluster, "{k}:kept")
        before = cluster.node_id(master)
        assert cluster.command(master, "WAITAOF", 1, 0, 2000) == [1, 0]  # on disk, then...
        master.kill()
        assert not master.running
        master.start()
        cluster.wait_until_ready()
        assert cluster.node_id(master) == before
        async with cluster_client(cluster) as rc:
            assert await rc.get("{k}:kept") == "before the crash"


async def test_the_launcher_restarts_a_dead_node(tmp_path: Path) -> None:
    with EmbeddedCluster(free_port_range(3), tmp_path) as cluster:
        supervisor = Supervisor()
        for unit in redis_units(cluster):
            unit.started_at = time.monotonic()
            supervisor.units.append(unit)
        assert len(supervisor.units) == 3
        victim, unit = cluster.masters[1], supervisor.units[1]
        assert unit.name == f"Redis Cluster node {victim.port}"
        # Killed from outside (kill() would tell the node object it was stopped on purpose).
        os.kill(int(cluster.command(victim, "INFO", "server")["process_id"]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while unit.restarts == 0 and time.monotonic() < deadline:
            supervisor.check()
            await asyncio.sleep(0.1)
        assert unit.restarts == 1 and victim.running
        cluster.wait_until_ready()


def test_a_second_start_reuses_the_cluster(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="launcher.redis_cluster")
    base = free_port_range(3)
    with EmbeddedCluster(base, tmp_path) as first:
        ids = [first.node_id(node) for node in first.nodes]
        ranges = owned_ranges(first)
        first.command(owner_of_slot(first, 0), "SET", "{06S}:survives", "yes")
    with EmbeddedCluster(base, tmp_path) as again:
        assert [again.node_id(node) for node in again.nodes] == ids
        assert owned_ranges(again) == ranges
        assert again.command(owner_of_slot(again, 0), "GET", "{06S}:survives") == "yes"
    assert sum("built a new Redis Cluster" in r.message for r in caplog.records) == 1


def owner_of_slot(cluster: EmbeddedCluster, slot: int) -> EmbeddedRedis:
    """The master whose range has the slot (`{06S}` hashes to slot 0)."""
    assert key_slot(b"{06S}:survives") == slot
    for port, owned in owned_ranges(cluster).items():
        if any(first <= slot <= last for first, last in owned):
            return next(m for m in cluster.masters if m.port == port)
    raise AssertionError(f"no master owns slot {slot}")


def test_a_cluster_moved_to_other_ports_is_refused_clearly(tmp_path: Path) -> None:
    with EmbeddedCluster(free_port_range(3), tmp_path):
        pass
    moved = EmbeddedCluster(free_port_range(3), tmp_path)
    with pytest.raises(EmbeddedRedisError, match="was built on ports"):
        moved.start()
    assert not any(node.running for node in moved.nodes)


def test_cluster_size_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_CLUSTER_SIZE", "1")
    with pytest.raises(ValidationError, match="at least 3 masters"):
        Settings(_env_file=None)
    monkeypatch.setenv("REDIS_CLUSTER_SIZE", "3")
    monkeypatch.setenv("REDIS_CLUSTER_REPLICAS", "1")
    settings = Settings(_env_file=None)
    assert (settings.redis_cluster_size, settings.redis_cluster_replicas) == (3, 1)
    monkeypatch.setenv("REDIS_CLUSTER_SIZE", "0")
    with pytest.raises(ValidationError, match="REDIS_CLUSTER_REPLICAS=1 needs"):
        Settings(_env_file=None)


def test_the_cluster_keeps_its_own_data_folder(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None, redis_data_dir=tmp_path, redis_cluster_size=3, redis_cluster_replicas=1
    )
    assert cluster_data_dir(settings) == tmp_path / "cluster-3x1"


@pytest.mark.slow
def test_run_with_a_cluster_size_starts_the_cluster_and_stops_it(tmp_path: Path) -> None:
    """`REDIS_CLUSTER_SIZE=3 make run`: the launcher starts the cluster, and the server it
    starts finds it is one (REDIS_MODE=auto) and gets ready on it."""
    base, server_port = free_port_range(3), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "KEY_PREFIX")}
    env |= {
        "REDIS_CLUSTER_SIZE": "3",
        "RUN_WORKERS": "0",
        "MODEL_BACKEND": "openai",
        "EMBEDDED_REDIS_PORT": str(base),
        "SERVER_PORT": str(server_port),
        "REDIS_DATA_DIR": str(tmp_path / "redis"),
    }
    run = Child("run", ["launcher"], env, tmp_path)
    try:
        run.wait_for_log("the server and workers use the cluster at")
        data = tmp_path / "redis" / "cluster-3x0"
        password = (data / PASSWORD_FILE).read_text(encoding="utf-8").strip()
        observer = EmbeddedCluster(base, data, password=password)  # not started: it only asks
        assert [observer.cluster_info(n)["cluster_state"] for n in observer.nodes] == ["ok"] * 3
        run.wait_for_log("server ready")
        ready = httpx.get(f"http://127.0.0.1:{server_port}/readyz", timeout=10).json()
        assert ready["redis"] == {"mode": "cluster", "masters": 3, "state": "ok", "partitions": 24}
    finally:
        status = run.interrupt()
    log = run.log()
    assert status == 0, log
    assert password not in log
    assert not any(port_in_use(port) for port in observer.ports)
    assert not (tmp_path / "redis" / "appendonlydir").exists()  # no single Redis's files
