"""Every Prometheus metric of the service, defined once (docs/metrics.md).

The server and the workers import the metric objects from here and only `inc()`, `dec()` or
`observe()` them on the hot path (1-2 µs each, no I/O; docs/benchmarks.md). The queue's
length is not counted at all: it is read from Redis when /metrics is scraped (`QueueCollector`),
so it cannot drift when a process dies between a `+1` and its `-1`.

With `SERVER_WORKERS > 1` the server's processes write their values to files in
`PROMETHEUS_MULTIPROC_DIR` (prometheus-client's multi-process mode, set up by
`python -m server`), and a scrape adds them up (`serving_registry`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis import Redis, RedisCluster
from redis.exceptions import RedisError

from core.config import Settings
from core.keys import Keys

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets: a first token from a local 135M model comes in tens of milliseconds, a hosted
# model's in seconds; a whole reply takes up to MODEL_TIMEOUT_SECONDS (60 s by default).
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REPLY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)

# --- Server ------------------------------------------------------------------------------------
MESSAGES_RECEIVED = Counter(
    "chat_messages_received", "Chat messages stored and queued for a reply (server)"
)
SOCKETS_OPEN = Gauge(
    "chat_sockets_open", "Chat sockets open now (server)", multiprocess_mode="livesum"
)

# --- Workers -----------------------------------------------------------------------------------
REPLIES = Counter(
    "chat_replies",
    "Replies stored, by outcome: answered, stopped, or the error code (worker)",
    ["outcome"],
)
FIRST_TOKEN_SECONDS = Histogram(
    "chat_first_token_seconds",
    "From the start of a generation to its first streamed piece (worker)",
    buckets=FIRST_TOKEN_BUCKETS,
)
REPLY_SECONDS = Histogram(
    "chat_reply_seconds",
    "From the start of a generation to its reply stored (worker)",
    buckets=REPLY_BUCKETS,
)
GENERATIONS_IN_FLIGHT = Gauge(
    "chat_generations_in_flight", "Generations running now (worker)", multiprocess_mode="livesum"
)
WORKER_RECLAIMS = Counter(
    "chat_worker_reclaims",
    "Messages taken over from a worker that stopped answering (XAUTOCLAIM, worker)",
)
MODEL_ERRORS = Counter(
    "chat_model_errors", "Generations that failed, by error code (worker)", ["code"]
)


class QueueCollector(Collector):
    """chat_queue_waiting and chat_queue_pending, read from the consumer group at each scrape.

    `waiting` is the group's `lag` (entries not yet delivered to any worker); when Redis cannot
    tell it (lag is nil after some deletions) it is the stream's length minus the pending
    entries, which is the same number here because answered entries are deleted. `pending` is
    delivered but not yet answered: generating, or held by a worker waiting for its turn.
    The scrape runs in a thread, so this uses a small synchronous client of its own, made at
    the first scrape that reaches Redis: a cluster client when Redis is a cluster."""

    def __init__(self, settings: Settings) -> None:
        self._keys = Keys.from_settings(settings)
        self._settings = settings
        self._made: Redis | RedisCluster | None = None
        self._making = threading.Lock()

    @property
    def _redis(self) -> Redis | RedisCluster:
        with self._making:
            if self._made is None:
                self._made = self._connect()
            return self._made

    def _connect(self) -> Redis | RedisCluster:
        timeouts: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
        url, mode = self._settings.redis_url, self._settings.redis_mode
        plain = Redis.from_url(url, decode_responses=True, **timeouts)
        if mode == "auto":
            mode = "cluster" if int(plain.info("cluster").get("cluster_enabled", 0)) else "single"
        if mode == "single":
            return plain
        plain.close()
        return RedisCluster.from_url(url, decode_responses=True, **timeouts)

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "chat_queue_waiting", "Messages queued and not yet taken by a worker (from Redis)"
        )
        pending = GaugeMetricFamily(
            "chat_queue_pending", "Messages taken by a worker and not yet answered (from Redis)"
        )
        try:
            counts = self._read()
        except RedisError as exc:
            logger.warning("metrics: could not read the queue from Redis: %s", exc)
            return
        waiting.add_metric([], counts[0])
        pending.add_metric([], counts[1])
        yield waiting
        yield pending

    def _read(self) -> tuple[int, int]:
        waiting, pending = 0, 0
        for stream in self._keys.streams:
            lag, held = self._read_stream(stream)
            waiting, pending = waiting + lag, pending + held
        return waiting, pending

    def _read_stream(self, stream: str) -> tuple[int, int]:
        try:
            groups: Any = self._redis.xinfo_groups(stream)
        except RedisError as exc:
            if "no such key" in str(exc).lower():
                return 0, 0  # nothing was ever queued
            raise
        group = next((g for g in groups if g["name"] == self._keys.group), None)
        if group is None:
            return 0, 0
        pending = int(group["pending"])
        lag = group.get("lag")
        if lag is None:
            lag = max(0, int(self._redis.xlen(stream)) - pending)
        return int(lag), pending

    def close(self) -> None:
        if self._made is not None:
            self._made.close()


class _WithQueue(Collector):
    """This process's own metrics (the default registry) and the queue's."""

    def __init__(self, queue: QueueCollector | None) -> None:
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        if self._queue is not None:
            yield from self._queue.collect()


def serving_registry(queue: QueueCollector | None) -> CollectorRegistry:
    """What a scrape shows: in multi-process mode every process's values (summed from the
    files in PROMETHEUS_MULTIPROC_DIR), otherwise this process's; plus the queue gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if queue is not None:
            registry.register(queue)
    else:
        registry.register(_WithQueue(queue))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def serve_http(port: int, host: str, registry: CollectorRegistry) -> Any:
    """/metrics (any path, as prometheus-client serves it) on its own port, in a thread; the
    returned server's `shutdown()` stops it."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    logger.info("metrics at http://%s:%d/metrics", host, server.server_port)
    return server
