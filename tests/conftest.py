"""Fixtures shared by every test: a real Redis with RedisJSON, settings, clients.

One embedded Redis server serves the whole run (or the server named by TEST_REDIS_URL, e.g. a
Redis 8 container); each test gets its own KEY_PREFIX, so tests never see each other's data.
Tests that need a Redis Cluster use `redis_cluster`: 3 embedded masters, also one per run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.config import Settings
from core.redis import create_redis
from core.store import SessionStore
from launcher.redis_cluster import EmbeddedCluster, free_port_range
from launcher.redis_server import EmbeddedRedis, free_port
from tests.support.model_servers import ModelServer, ModelServerBehaviour
from tests.support.stack import Stack, running_stack


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TEST_REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis(free_port(), tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """A real 3-master Redis Cluster (no replicas) for the whole run, started on first use;
    tests connect to its `url` with a cluster client. Tests that kill or restart nodes
    start their own cluster instead."""
    with EmbeddedCluster(free_port_range(3), tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(params=["single", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The test runs twice: on the one embedded Redis and on the 3-master cluster (the same
    keys and scripts; the service detects the mode)."""
    if request.param == "cluster":
        cluster: EmbeddedCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    url: str = request.getfixturevalue("redis_url")
    return url


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    """Settings for a test: no .env, a fresh key prefix, quick leases, a small model budget."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": f"test-{uuid.uuid4().hex[:12]}",
        "worker_lease_seconds": 1.5,
        "worker_block_ms": 100,
        "worker_shutdown_grace_seconds": 2.0,
        "model_backend": "openai",
        "model_timeout_seconds": 10.0,
        "model_max_new_tokens": 24,
        "model_max_retries": 3,
        "client_dir": Path(__file__).resolve().parent.parent / "client" / "basic",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return make_settings(redis_url)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = create_redis(settings)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis: Redis, settings: Settings) -> SessionStore:
    return SessionStore(redis, settings)


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServer]:
    """A local server speaking the OpenAI and Hugging Face protocols (echo replies)."""
    async with ModelServer(ModelServerBehaviour()) as server:
        yield server


@pytest.fixture
def stack_settings(redis_url: str, model_server: ModelServer) -> Settings:
    return make_settings(redis_url, openai_base_url=model_server.openai_base_url)


@pytest.fixture
async def stack(stack_settings: Settings) -> AsyncIterator[Stack]:
    """Server and one worker in this event loop, answering through `model_server`."""
    async with running_stack(stack_settings) as running:
        yield running


@pytest.fixture
async def any_stack(any_redis_url: str, model_server: ModelServer) -> AsyncIterator[Stack]:
    """`stack`, once on the one embedded Redis and once on the 3-master cluster."""
    settings = make_settings(any_redis_url, openai_base_url=model_server.openai_base_url)
    async with running_stack(settings) as running:
        yield running
