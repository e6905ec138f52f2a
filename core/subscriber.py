"""Sharded Pub/Sub (SSUBSCRIBE) on one Redis or on every node of a Redis Cluster.

A sharded channel lives on the node that serves its slot, so a process that listens to
channels of every slot needs a connection to every node. This keeps one plain Pub/Sub
connection per node, each read by its own task: a message is handed over as soon as it
arrives, whatever the other nodes do. (redis-py's cluster Pub/Sub polls its nodes in turn, so
a quiet node delays the others by its read timeout, and with no channel at all it spins.)

What can be missed is said, never hidden: when a node's connection fails (a restart, a
failover) or Redis moves a channel away (a SUNSUBSCRIBE nobody asked for: its slot went to
another node), `on_lost` is called, since messages may have been published meanwhile, and the
channels are subscribed again, on the node now serving them, with backoff until that works.
The connections do not retry by themselves: a silent reconnect would hide the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, SlotNotCoveredError

from core.redis import AnyRedis

logger = logging.getLogger(__name__)

SINGLE = "single"  # the node name of a Redis that is not a cluster
CONFIRM_SECONDS = 10.0
READ_SECONDS = 1.0  # a read wakes at least this often, so a closing reader is not kept


class _Node:
    """One node's Pub/Sub connection, its channels and its reader."""

    def __init__(self, name: str, client: Redis) -> None:
        self.name = name
        self.client = client
        self.pubsub: PubSub = client.pubsub()
        self.channels: set[str] = set()
        self.reader: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        with contextlib.suppress(RedisError, OSError):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


class ShardedSubscriber:
    def __init__(
        self,
        redis: AnyRedis,
        on_message: Callable[[str, str], None],
        on_lost: Callable[[], None],
        on_moved: Callable[[str], None] | None = None,
    ) -> None:
        """`on_lost`: a node's connection was lost, so any channel may have missed messages.
        `on_moved(channel)`: only that channel may have (its slot moved to another node);
        without it, `on_lost` is called then too."""
        self._redis = redis
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_moved = on_moved
        self._nodes: dict[str, _Node] = {}
        self._wanted: set[str] = set()
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._repairs: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._losses = 0  # connections lost since a subscription was last confirmed
        self.failed: BaseException | None = None

    @property
    def running(self) -> bool:
        """False once a reader failed in a way that is not Redis going away (a bug)."""
        return self.failed is None

    async def subscribe(self, *channels: str) -> None:
        """Subscribe and return once Redis has confirmed every channel (a message published
        before the confirmation would be missed)."""
        self._wanted.update(channels)
        if isinstance(self._redis, RedisCluster):
            await self._redis.initialize()  # the slot map, on a client that sent nothing yet
        async with self._lock:
            waits = []
            for node, names in self._by_node(channels).items():
                for channel in names:
                    future = asyncio.get_running_loop().create_future()
                    self._confirmations[channel] = future
                    waits.append(future)
                for channel in names:  # one per command: its channels must share a slot
                    await node.pubsub.ssubscribe(channel)
                node.channels.update(names)
                if node.reader is None:
                    node.reader = asyncio.create_task(self._read(node), name=f"sub-{node.name}")
        await asyncio.wait_for(asyncio.gather(*map(asyncio.shield, waits)), CONFIRM_SECONDS)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._confirmations.pop(channel, None)
        async with self._lock:
            # A copy: a reader that loses its node removes it from `_nodes` meanwhile.
            for node in tuple(self._nodes.values()):
                if channel in node.channels:
                    node.channels.discard(channel)
                    with contextlib.suppress(RedisError, OSError):
                        await node.pubsub.sunsubscribe(channel)

    async def aclose(self) -> None:
        self._wanted.clear()
        for repair in tuple(self._repairs):
            repair.cancel()
        await asyncio.gather(*self._repairs, return_exceptions=True)
        for node in tuple(self._nodes.values()):
            await node.aclose()
        self._nodes.clear()

    def _by_node(self, channels: tuple[str, ...] | set[str]) -> dict[_Node, list[str]]:
        grouped: dict[_Node, list[str]] = {}
        for channel in channels:
            grouped.setdefault(self._node_for(channel), []).append(channel)
        return grouped

    def _node_for(self, channel: str) -> _Node:
        if isinstance(self._redis, RedisCluster):
            owner = self._redis.get_node_from_key(channel)
            if owner is None:
                raise SlotNotCoveredError(f"no node serves the slot of {channel}")
            name, kwargs = owner.name, dict(owner.connection_kwargs)
        else:
            name, kwargs = SINGLE, dict(self._redis.connection_pool.connection_kwargs)
        node = self._nodes.get(name)
        if node is None:
            node = self._nodes[name] = _Node(name, _pubsub_client(kwargs))
        return node

    async def _read(self, node: _Node) -> None:
        """Read the node's connection until it fails. A message is handed over from the raw
        reply: redis-py's `get_message` wraps each read in its retry, telemetry and parsing
        layers, 13-17% of a busy server's py-spy samples (three messages per chat message). The
        other replies (confirmations, unsubscriptions) still go through `handle_message`,
        which keeps the Pub/Sub object's own bookkeeping, and the idle connection's health
        check PING is sent as `get_message` sends it."""
        pubsub = node.pubsub
        loop = asyncio.get_running_loop()
        try:
            while True:
                connection = pubsub.connection
                if connection is None:
                    raise RuntimeError("the Pub/Sub connection is gone")
                if loop.time() > connection.next_health_check:
                    await pubsub.check_health()
                reply = await connection.read_response(
                    timeout=READ_SECONDS, disconnect_on_error=False, push_request=True
                )
                if type(reply) is list and reply[0] == "smessage":
                    self._on_message(reply[1], reply[2])
                    continue
                if reply is None or reply in pubsub.health_check_response:
                    continue
                message = await pubsub.handle_message(reply)
                if message is not None:
                    self._handle(node, message)
        except (RedisError, OSError) as exc:
            logger.warning("Pub/Sub connection to %s lost (%s); subscribing again", node.name, exc)
            await self._lost(node)
        except Exception as exc:
            self.failed = exc
            logger.exception("Pub/Sub reader for %s failed", node.name)

    def _handle(self, node: _Node, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "smessage":
            self._on_message(channel, message["data"])
        elif kind == "ssubscribe":
            self._losses = 0
            confirmation = self._confirmations.pop(channel, None)
            if confirmation is not None and not confirmation.done():
                confirmation.set_result(None)
        elif kind == "sunsubscribe" and channel in node.channels and channel in self._wanted:
            self._dropped(node, channel)

    def _dropped(self, node: _Node, channel: str) -> None:
        """The node unsubscribed a channel nobody gave up: its slot moved to another node
        (a reshard), which is where it is published now. Messages may have been missed
        between the move and the new subscription, so the owner is told (about this channel
        only, when it asked), and the channel is subscribed again where it is served now."""
        logger.warning(
            "Pub/Sub channel %s was unsubscribed by %s (its slot moved); subscribing again",
            channel,
            node.name,
        )
        node.channels.discard(channel)
        self._losses += 1
        if self._on_moved is not None:
            self._on_moved(channel)
        else:
            self._on_lost()
        self._repair({channel})

    async def _lost(self, node: _Node) -> None:
        """Tell the owner that messages may have been missed, drop the node's connection, and
        subscribe its channels again wherever they are served now."""
        self._nodes.pop(node.name, None)
        self._losses += 1
        await node.aclose()
        self._on_lost()
        self._repair(node.channels)

    def _repair(self, channels: set[str]) -> None:
        repair = asyncio.create_task(self._resubscribe(set(channels)), name="sub-repair")
        self._repairs.add(repair)
        repair.add_done_callback(self._repairs.discard)

    async def _resubscribe(self, channels: set[str]) -> None:
        """Subscribe `channels` again, after a wait that grows with the losses in a row (a
        node that fails each new connection at once is not hammered)."""
        delay = min(0.05 * 2**self._losses, 5.0)
        await asyncio.sleep(delay)
        while wanted := channels & self._wanted:
            try:
                if isinstance(self._redis, RedisCluster):
                    await self._redis.nodes_manager.initialize()  # who serves which slot now
                await self.subscribe(*wanted)
                return
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning(
                    "Pub/Sub not subscribed again yet (%s); retrying in %.1fs", exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


# What a node's Pub/Sub client takes from the main client's connection settings.
_CONNECTION_SETTINGS = (
    "host",
    "port",
    "db",
    "username",
    "password",
    "credential_provider",
    "socket_connect_timeout",
    "socket_keepalive",
    "client_name",
    "driver_info",
)


def _pubsub_client(kwargs: dict[str, Any]) -> Redis:
    """A client for one node's Pub/Sub connection, with the main client's address and
    credentials (and TLS settings) and no retries of its own (see the module's docstring)."""
    chosen = {name: kwargs[name] for name in _CONNECTION_SETTINGS if name in kwargs}
    tls = {name: value for name, value in kwargs.items() if name.startswith("ssl_")}
    if tls:
        chosen.update(tls, ssl=True)
    return Redis(
        **chosen, retry=Retry(NoBackoff(), 0), health_check_interval=15, decode_responses=True
    )
