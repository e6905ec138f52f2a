"""A local Redis Cluster from the embedded `redis-server`: what `REDIS_CLUSTER_SIZE=3 make run`
and the cluster tests run on (issue 13, "Try it locally").

Every node is an EmbeddedRedis (same binary, RedisJSON module, loopback, append-only file,
password, maxmemory with noeviction) with cluster mode on, in its own subfolder `node-<i>`
of the cluster's data folder. The masters take ports `base_port`, `base_port + 1`, ...; the
replicas the ports after them; each node's cluster bus is its port + 10000.

The first start builds the cluster: the 16384 slots split into one contiguous range per master
(`CLUSTER ADDSLOTSRANGE`), the nodes introduced (`CLUSTER MEET`), each replica attached to its
master (`CLUSTER REPLICATE`). Each node records the cluster in its `nodes.conf`, so a later
start on the same folder (and the same ports) brings back that cluster, data included, rather
than building a new one over it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from launcher.redis_server import EmbeddedRedis, EmbeddedRedisError, private_dir

logger = logging.getLogger(__name__)

SLOTS = 16384
BUS_PORT_OFFSET = 10000  # Redis Cluster's bus listens on the client port + 10000
MIN_MASTERS = 3  # below this a majority cannot survive the loss of one master
LOCAL = "127.0.0.1"


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """0..16383 in `masters` contiguous ranges whose sizes differ by at most one."""
    bounds = [n * SLOTS // masters for n in range(masters + 1)]
    return [(bounds[n], bounds[n + 1] - 1) for n in range(masters)]


def _can_bind(port: int) -> bool:
    """Whether Redis could listen there. SO_REUSEADDR as Redis sets it: a port left in
    TIME_WAIT by a node that just stopped is free for the node that starts next."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCAL, port))
        except OSError:
            return False
        return True


def free_port_range(n: int, *, attempts: int = 200) -> int:
    """The first of `n` consecutive free ports whose bus ports (+10000) are free too."""
    highest = 65535 - BUS_PORT_OFFSET - n
    for _ in range(attempts):
        base = 20000 + secrets.randbelow(highest - 20000)
        ports = range(base, base + n)
        if all(_can_bind(p) and _can_bind(p + BUS_PORT_OFFSET) for p in ports):
            return base
    raise EmbeddedRedisError(f"found no {n} consecutive free ports (with their bus ports)")


def _parse_info(text: str) -> dict[str, str]:
    """`CLUSTER INFO`'s `name:value` lines."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {name.strip(): value.strip() for name, value in pairs}


class EmbeddedCluster:
    """`with EmbeddedCluster(base_port, data_dir) as cluster: cluster.url` — N masters (and R
    replicas each), built on the first start, brought back from `nodes.conf` on the next."""

    def __init__(
        self,
        base_port: int,
        data_dir: Path,
        *,
        masters: int = MIN_MASTERS,
        replicas: int = 0,
        server_bin: Path | None = None,
        module: Path | None = None,
        password: str | None = None,
        maxmemory: str | None = "512mb",
        node_timeout_ms: int = 5000,
    ) -> None:
        if masters < MIN_MASTERS:
            raise EmbeddedRedisError(f"a Redis Cluster needs at least {MIN_MASTERS} masters")
        if replicas < 0:
            raise EmbeddedRedisError("replicas per master cannot be negative")
        self.data_dir = data_dir
        self.password = password
        self.replicas_per_master = replicas
        # node-timeout: how long a silent master has before its replica takes over (Redis's
        # default is 15 s; locally 5 s keeps a failover quick without false alarms).
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # A replica syncs at once instead of waiting 5 s for others to join it.
                "--repl-diskless-sync-delay", "0"]  # fmt: skip
        # A replica logs in to its master with the same password; kept in the config file.
        config = [f"masterauth {password}"] if password else []
        self.nodes = [
            EmbeddedRedis(
                base_port + n,
                data_dir / f"node-{n}",
                server_bin=server_bin,
                module=module,
                password=password,
                maxmemory=maxmemory,
                extra_args=args,
                extra_config=config,
            )
            for n in range(masters * (1 + replicas))
        ]
        self.masters = self.nodes[:masters]
        self.replicas = self.nodes[masters:]

    @property
    def url(self) -> str:
        """A master's URL: a cluster client finds the other nodes from any one of them."""
        return self.masters[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def master_of(self, replica: EmbeddedRedis) -> EmbeddedRedis:
        """The master a replica was built to follow (a failover can swap their roles since)."""
        return self.masters[self.replicas.index(replica) // self.replicas_per_master]

    def describe(self) -> str:
        """For the start-up log: where the nodes are and where their data is."""
        first, last = self.masters[0].port, self.masters[-1].port
        masters = f"{len(self.masters)} masters on {LOCAL}:{first}-{last}"
        if self.replicas:
            masters += (
                f", {self.replicas_per_master} replica(s) each on "
                f"{self.replicas[0].port}-{self.replicas[-1].port}"
            )
        return f"{masters} (data in {self.data_dir})"

    def start(self, timeout: float = 30.0) -> None:
        """Starts every node; builds the cluster if these folders hold none yet. Returns when
        every node sees `cluster_state:ok` and every replica's link to its master is up."""
        private_dir(self.data_dir)
        try:
            for node in self.nodes:
                self._check_bus_port(node)
                node.start(timeout)
            if self._is_new():
                self._create(timeout)
            else:
                self._check_layout()
            self.wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("embedded Redis Cluster: %s", self.describe())

    @staticmethod
    def _check_bus_port(node: EmbeddedRedis) -> None:
        bus = node.port + BUS_PORT_OFFSET
        if not _can_bind(bus):
            raise EmbeddedRedisError(
                f"Port {bus} (the cluster bus of port {node.port}) is already in use: set "
                "EMBEDDED_REDIS_PORT to another first port"
            )

    @contextlib.contextmanager
    def client(self, node: EmbeddedRedis) -> Iterator[redis.Redis]:
        """A plain connection to one node, for cluster commands and per-node checks."""
        connection = redis.Redis(
            host=LOCAL, port=node.port, password=self.password, decode_responses=True,
            socket_timeout=5,
        )  # fmt: skip
        try:
            yield connection
        finally:
            connection.close()

    def command(self, node: EmbeddedRedis, *args: str | int) -> Any:
        """One command on one node (`CLUSTER ...`, which a cluster client would route)."""
        with self.client(node) as conn:
            return conn.execute_command(*args)  # type: ignore[no-untyped-call]

    def cluster_info(self, node: EmbeddedRedis) -> dict[str, str]:
        return _parse_info(str(self.command(node, "CLUSTER", "INFO")))

    def node_id(self, node: EmbeddedRedis) -> str:
        return str(self.command(node, "CLUSTER", "MYID"))

    def _is_new(self) -> bool:
        """True when no node belongs to a cluster yet. Some but not all is refused: building
        over them would throw away the data of those that do."""
        joined = [
            node
            for node in self.nodes
            if (info := self.cluster_info(node))["cluster_known_nodes"] != "1"
            or info["cluster_slots_assigned"] != "0"
        ]
        if not joined:
            return True
        if len(joined) < len(self.nodes):
            lone = [str(node.data_dir) for node in self.nodes if node not in joined]
            raise EmbeddedRedisError(
                f"{', '.join(lone)} hold(s) no cluster but the other nodes in {self.data_dir} "
                "do: restore those folders, or remove the whole folder to build a new cluster "
                "(its data is lost)"
            )
        return False

    def _create(self, timeout: float) -> None:
        for node, (first, last) in zip(self.masters, slot_ranges(len(self.masters)), strict=True):
            self.command(node, "CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            self.command(self.nodes[0], "CLUSTER", "MEET", LOCAL, node.port)
        # CLUSTER REPLICATE needs the replica to know its master already.
        self._wait_for(self._unknown_nodes, timeout)
        for replica in self.replicas:
            self.command(replica, "CLUSTER", "REPLICATE", self.node_id(self.master_of(replica)))
        logger.info("built a new Redis Cluster in %s", self.data_dir)

    def _check_layout(self) -> None:
        """A cluster brought back must be on the ports it was built on: its nodes look for
        each other at the addresses in their nodes.conf."""
        listing = str(self.command(self.nodes[0], "CLUSTER", "NODES"))
        known = sorted(int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                       for line in listing.splitlines() if line.strip())  # fmt: skip
        if known != sorted(self.ports):
            raise EmbeddedRedisError(
                f"the cluster in {self.data_dir} was built on ports {known}, not "
                f"{sorted(self.ports)}: start it with its first port as before"
            )

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Until every node says `cluster_state:ok` and every replica's link is up (after a
        start, or after a node was restarted)."""
        self._wait_for(self._not_ready, timeout)

    def _wait_for(self, problem: Callable[[], str | None], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (found := problem()) is not None:
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"the Redis Cluster in {self.data_dir} is not ready after {timeout}s: "
                    f"{found} (see the redis.log in each node's folder)"
                )
            time.sleep(0.05)

    def _unknown_nodes(self) -> str | None:
        for node in self.nodes:
            known = self.cluster_info(node)["cluster_known_nodes"]
            if known != str(len(self.nodes)):
                return f"port {node.port} knows {known} of {len(self.nodes)} nodes"
        return None

    def _not_ready(self) -> str | None:
        """What is not ready yet, or None. Roles are read from the nodes, not assumed: after
        a failover a replica may be a master and the old master its replica."""
        try:
            if (unknown := self._unknown_nodes()) is not None:
                return unknown
            following = 0
            for node in self.nodes:
                if (state := self.cluster_info(node)["cluster_state"]) != "ok":
                    return f"port {node.port} has cluster_state:{state}"
                with self.client(node) as conn:
                    replication = conn.info("replication")
                if replication["role"] == "slave":
                    following += 1
                    if replication.get("master_link_status") != "up":
                        return f"replica on port {node.port} has no link to its master yet"
        except (redis.RedisError, OSError) as exc:
            return f"a node does not answer ({exc})"
        if following != len(self.replicas):
            return f"{following} of {len(self.replicas)} replicas follow a master"
        return None

    def stop(self) -> None:
        """SIGTERM to every node (each flushes its append-only file), replicas first."""
        for node in reversed(self.nodes):
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.stop()
