"""The embedded Redis: the real server, the JSON module, persistence across a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Settings
from core.redis import create_redis, readiness_problem
from core.store import SessionStore
from launcher.redis_server import EmbeddedRedis, EmbeddedRedisError, free_port
from tests.conftest import make_settings


async def test_json_and_streams_and_aof_survive_a_restart(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedRedis(port, tmp_path) as server:
        settings: Settings = make_settings(server.url)
        redis = create_redis(settings)
        assert await readiness_problem(redis, SessionStore(redis, settings).keys) is None
        info = await redis.info("server")
        assert str(info["redis_version"]).startswith(("7.", "8."))
        assert any(m["name"] == "ReJSON" for m in await redis.module_list())
        store = SessionStore(redis, settings)
        session = await store.create("Ann")
        await store.add_human_message(session.token, "remember me")
        await redis.aclose()
    assert (tmp_path / "appendonlydir").is_dir()

    with EmbeddedRedis(port, tmp_path) as restarted:
        redis = create_redis(settings)
        store = SessionStore(redis, settings)
        messages = await store.messages(session.token)
        ttl = await redis.ttl(store.keys.session(session.token))
        queued = await redis.xlen(store.keys.requests)
        await redis.aclose()
        assert restarted.running
    assert messages is not None and [m.msg for m in messages] == ["remember me"]
    assert 0 < ttl <= settings.session_ttl_seconds
    assert queued == 1


def test_binds_to_loopback_only(tmp_path: Path) -> None:
    server = EmbeddedRedis(free_port(), tmp_path)
    command = server.command()
    assert command[command.index("--bind") + 1] == "127.0.0.1"
    assert "--appendonly" in command


async def test_password_url(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path, password="s3cret") as server:
        assert ":s3cret@" in server.url
        redis = create_redis(make_settings(server.url))
        assert await redis.ping()
        await redis.aclose()


def test_a_busy_port_is_reported_clearly(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path / "a") as first:
        second = EmbeddedRedis(first.port, tmp_path / "b")
        with pytest.raises(EmbeddedRedisError, match="already in use"):
            second.start()
