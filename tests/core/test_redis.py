"""core/redis.py: the client every process makes, on the embedded Redis and on the cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.utils
from redis.asyncio import Redis

from core.redis import connect_redis, driver_info
from tests.conftest import make_settings


def _count_version_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of redis-py's package-metadata version lookup, from now on."""
    calls: list[str] = []
    lookup: Callable[[], str] = redis.utils.get_lib_version

    def counted() -> str:
        calls.append("get_lib_version")
        return lookup()

    monkeypatch.setattr(redis.utils, "get_lib_version", counted)
    return calls


async def test_new_connections_do_not_read_package_metadata(
    any_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of concurrent commands opens a connection for each. None of them may cost a
    scan of the installed packages' metadata (redis-py's default for CLIENT SETINFO: about
    1 ms per connection, more where many packages are installed)."""
    driver_info()  # the one lookup a process makes, at its first client
    calls = _count_version_lookups(monkeypatch)
    client = await connect_redis(make_settings(any_redis_url))
    try:
        await asyncio.gather(*(client.ping() for _ in range(20)))
    finally:
        await client.aclose()
    assert calls == []


async def test_connections_still_tell_redis_the_client_library(redis_url: str) -> None:
    """CLIENT LIST shows redis-py and its version for each of the service's connections, as
    redis-py's default does, for an operator looking at who is connected."""
    client = await connect_redis(make_settings(redis_url))
    try:
        info = await client.client_info()
    finally:
        await client.aclose()
    assert info["lib-name"] == "redis-py"
    assert info["lib-ver"] == redis.__version__
    assert isinstance(client, Redis)
