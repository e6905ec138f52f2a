"""Workers ride out Redis refusing commands (OOM, READONLY, MISCONF, BUSY, LOADING).

Each test starts its own Redis (never the shared session Redis, whose config the other tests
rely on), makes it refuse while a worker holds messages, lets the condition clear, and checks
that every message is then answered exactly once and nothing is left pending.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.config import Settings
from core.redis import create_redis, ensure_group
from core.store import SessionStore
from launcher.redis_server import EmbeddedRedis, free_port, port_in_use
from tests.conftest import make_settings
from tests.support import sessions
from tests.support.model_servers import ModelServer
from worker.worker import Worker

MESSAGES = 6


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(free_port(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def settings_for(url: str, model_server: ModelServer) -> Settings:
    return make_settings(url, openai_base_url=model_server.openai_base_url)


async def queue_messages(store: SessionStore, count: int = MESSAGES) -> list[tuple[str, str]]:
    """`count` messages over three sessions: (token, message id) each."""
    tokens = [(await store.create(f"user{n}")).token for n in range(3)]
    queued = []
    for n in range(count):
        token = tokens[n % len(tokens)]
        message = await sessions.add_human_message(store, token, f"message {n}")
        assert message is not None
        queued.append((token, message.id))
    return queued


async def assert_answered_once(
    store: SessionStore, queued: list[tuple[str, str]], timeout: float = 30
) -> None:
    """Every queued message gets exactly one reply, and the stream holds no pending entry."""
    async with asyncio.timeout(timeout):
        while True:
            replies: dict[str, int] = {}
            for token in {t for t, _ in queued}:
                for m in await sessions.messages(store, token) or []:
                    if m.reply_to is not None:
                        replies[m.reply_to] = replies.get(m.reply_to, 0) + 1
            if all(replies.get(message_id) for _, message_id in queued):
                break
            await asyncio.sleep(0.1)
    assert all(replies[message_id] == 1 for _, message_id in queued), replies
    assert await sessions.pending_entries(store.redis, store.keys) == 0


async def ride_out(
    settings: Settings,
    store: SessionStore,
    refuse: Callable[[], Awaitable[None]],
    clear: Callable[[], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
    *,
    refusing_for: float = 2.0,
    answers_in: SessionStore | None = None,
) -> None:
    """Queue messages, start refusing, run a worker through it, clear, check the answers
    (in `answers_in`, when the worker uses another Redis than `store`)."""
    queued = await queue_messages(store)
    await refuse()
    worker = Worker(settings)
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(refusing_for)
        assert not run.done(), "the worker exited while Redis refused commands"
        await clear()
        await assert_answered_once(answers_in or store, queued)
        assert not run.done()
    finally:
        worker.request_shutdown()
        await asyncio.wait_for(run, 30)
    refusals = [r for r in caplog.records if "refus" in r.getMessage()]
    # One line per episode and loop (read, reclaim, heartbeat, control, entries, start), not
    # one per attempt.
    assert 0 < len(refusals) <= 12, [r.getMessage() for r in refusals]


async def test_out_of_memory_is_ridden_out(
    own_redis: EmbeddedRedis, model_server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = settings_for(own_redis.url, model_server)
    async with create_redis(settings) as admin:
        store = SessionStore(admin, settings)
        await ensure_group(admin, store.keys)

        async def refuse() -> None:
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")

        async def clear() -> None:
            await admin.config_set("maxmemory", "0")

        await ride_out(settings, store, refuse, clear, caplog)


async def test_a_read_only_replica_is_ridden_out_until_promoted(
    own_redis: EmbeddedRedis,
    tmp_path: Path,
    model_server: ModelServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with EmbeddedRedis(free_port(), tmp_path / "replica") as replica:
        primary_settings = settings_for(own_redis.url, model_server)
        settings = primary_settings.model_copy(update={"redis_url": replica.url})
        async with create_redis(primary_settings) as primary, create_redis(settings) as copy:
            await copy.replicaof("127.0.0.1", own_redis.port)
            store = SessionStore(primary, primary_settings)
            await ensure_group(primary, store.keys)
            replica_store = SessionStore(copy, settings)

            async def refuse() -> None:
                async with asyncio.timeout(15):
                    while (await copy.info("replication"))["master_link_status"] != "up":
                        await asyncio.sleep(0.05)
                    while await sessions.queued_entries(copy, store.keys) < MESSAGES:
                        await asyncio.sleep(0.05)

            async def clear() -> None:  # a failover: the replica is promoted
                await copy.replicaof("NO", "ONE")

            await ride_out(settings, store, refuse, clear, caplog, answers_in=replica_store)


async def test_misconf_after_a_failed_save_is_ridden_out(
    tmp_path: Path, model_server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # `dir` is a protected setting: CONFIG SET may change it only when allowed at start.
    own_redis = EmbeddedRedis(
        free_port(), tmp_path / "redis", extra_args=["--enable-protected-configs", "yes"]
    )
    settings = settings_for(own_redis.url, model_server)
    doomed = tmp_path / "doomed"
    with own_redis:
        async with create_redis(settings) as admin:
            store = SessionStore(admin, settings)
            await ensure_group(admin, store.keys)
            original_dir = str((await admin.config_get("dir"))["dir"])

            async def refuse() -> None:
                await make_saves_fail(admin, doomed)

            async def clear() -> None:
                await admin.config_set("dir", original_dir)
                await save_ok(admin)

            await ride_out(settings, store, refuse, clear, caplog)


async def make_saves_fail(admin: Redis, doomed: Path) -> None:
    """BGSAVE into a directory that is removed: the save fails, and with
    stop-writes-on-bgsave-error Redis refuses writes with MISCONF."""
    await asyncio.to_thread(doomed.mkdir)
    await admin.config_set("stop-writes-on-bgsave-error", "yes")
    await admin.config_set("save", "3600 1")
    await admin.config_set("dir", str(doomed))
    await asyncio.to_thread(shutil.rmtree, doomed)
    await admin.bgsave()
    async with asyncio.timeout(15):
        while (await admin.info("persistence"))["rdb_last_bgsave_status"] != "err":
            await asyncio.sleep(0.05)


async def save_ok(admin: Redis) -> None:
    async with asyncio.timeout(15):
        while (await admin.info("persistence"))["rdb_bgsave_in_progress"]:
            await asyncio.sleep(0.05)
        await admin.bgsave()
        while (await admin.info("persistence"))["rdb_last_bgsave_status"] != "ok":
            await asyncio.sleep(0.05)


SPIN = """
local start = redis.call('TIME')
local started = tonumber(start[1]) * 1000000 + tonumber(start[2])
while true do
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) - started > tonumber(ARGV[1]) then
    return 1
  end
end
"""


async def test_busy_script_is_ridden_out(
    own_redis: EmbeddedRedis, model_server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = settings_for(own_redis.url, model_server)
    async with create_redis(settings) as admin, Redis.from_url(own_redis.url) as spinner:
        store = SessionStore(admin, settings)
        await ensure_group(admin, store.keys)
        await admin.config_set("busy-reply-threshold", "100")
        spinning: list[asyncio.Task[Any]] = []

        async def refuse() -> None:
            spinning.append(asyncio.ensure_future(spinner.eval(SPIN, 0, 2_500_000)))
            await asyncio.sleep(0.3)

        async def clear() -> None:
            assert await spinning[0] == 1

        await ride_out(settings, store, refuse, clear, caplog, refusing_for=1.0)


async def test_loading_after_a_restart_is_ridden_out(
    tmp_path: Path, model_server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    data = tmp_path / "redis"
    settings = settings_for(f"redis://127.0.0.1:{port}/0", model_server)
    with EmbeddedRedis(port, data):
        async with create_redis(settings) as admin:
            store = SessionStore(admin, settings)
            await ensure_group(admin, store.keys)
            queued = await queue_messages(store)
            # A dataset that takes seconds to load (1 ms per key): an RDB-preamble AOF.
            async with admin.pipeline(transaction=False) as pipe:
                for n in range(6000):
                    pipe.set(f"{settings.key_prefix}:ballast:{n}", "x")
                await pipe.execute()
            await admin.bgrewriteaof()
            async with asyncio.timeout(15):
                while (await admin.info("persistence"))["aof_rewrite_in_progress"]:
                    await asyncio.sleep(0.05)
    restarted = EmbeddedRedis(port, data, extra_args=["--key-load-delay", "1000"])
    starting = asyncio.create_task(asyncio.to_thread(restarted.start, 60.0))
    worker = Worker(settings)
    run: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(15):
            while not port_in_use(port):
                await asyncio.sleep(0.01)
        run = asyncio.create_task(worker.run())  # Redis answers LOADING now
        await starting  # returns once it answers PONG
        assert not run.done(), "the worker exited while Redis was loading"
        async with create_redis(settings) as admin:
            await assert_answered_once(SessionStore(admin, settings), queued)
    finally:
        worker.request_shutdown()
        if run is not None:
            await asyncio.wait_for(run, 30)
        await starting
        restarted.stop()
