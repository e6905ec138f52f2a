"""The fault suite: real server and worker processes, a real Redis, users that reconnect like
real clients; each test injects one fault under a load of sessions and counts, from the final
histories and every frame each socket received, what was lost, duplicated or misdelivered
(tests/support/ledger.py). The table of figures is printed at the end of the pytest run.
docs/faults.md describes each fault and what is (and is not) guaranteed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.config import Settings
from core.keys import Keys
from core.redis import create_redis
from tests.conftest import make_settings
from tests.support.cluster import Cluster, drive, users
from tests.support.model_servers import ModelServer, ModelServerBehaviour
from tests.support.processes import settings_env

pytestmark = pytest.mark.slow


@pytest.fixture
async def model() -> AsyncIterator[ModelServer]:
    async with ModelServer(ModelServerBehaviour(token_delay=0.03)) as server:
        yield server


@pytest.fixture
def fault_settings(redis_url: str, model: ModelServer) -> Settings:
    return make_settings(redis_url, openai_base_url=model.openai_base_url)


@pytest.fixture
def cluster(fault_settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(settings_env(fault_settings, MODEL_MAX_RETRIES="2"), tmp_path)
    try:
        yield running
    finally:
        running.stop()


async def test_workers_killed_repeatedly_under_load(
    cluster: Cluster, model: ModelServer, fault_settings: Settings
) -> None:
    """SIGKILL a worker that is generating, again and again, while 12 sessions chat; a new
    worker replaces each one. Every message is answered exactly once, in order."""
    model.behaviour.token_delay = 0.06
    await asyncio.gather(cluster.add_server(), cluster.add_server())
    await asyncio.gather(*(cluster.add_worker() for _ in range(3)))
    kills = 0

    keys = Keys(fault_settings.key_prefix)

    async def kill_workers(done: asyncio.Event) -> None:
        nonlocal kills
        rng = random.Random(4)
        redis = create_redis(fault_settings)
        try:
            await _wait_or_done(done, 1.0)
            while not done.is_set():
                # The victim: a worker holding a message now (it is generating), if any.
                pending = await redis.xpending_range(
                    keys.requests, keys.group, min="-", max="+", count=100
                )
                holders = {str(p["consumer"]) for p in pending}
                busy = [w for w in cluster.workers if any(f"-{w.pid}-" in c for c in holders)]
                cluster.kill(rng.choice(busy or cluster.workers))
                kills += 1
                await cluster.add_worker(wait=False)
                await _wait_or_done(done, 1.5)
        finally:
            await redis.aclose()

    run = await drive(
        "worker SIGKILL mid-generation, repeatedly",
        users(12, cluster, gap=0.2),
        5,
        during=kill_workers,
    )
    run.notes = f"{kills} workers killed"
    run.assert_clean()
    assert kills >= 2


async def _wait_or_done(done: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), seconds)


async def test_no_worker_then_one_starts(cluster: Cluster) -> None:
    """With no worker running, messages are stored and queued; a worker that starts later
    answers every one of them, in order."""
    await cluster.add_server()
    people = users(6, cluster)

    async def start_worker_late(done: asyncio.Event) -> None:
        async with asyncio.timeout(60):
            while not all(len(u.ids) == 3 for u in people):
                await asyncio.sleep(0.1)
        # Everything is acknowledged and nothing can be answered.
        assert not any(u.finals for u in people)
        await cluster.add_worker()

    run = await drive("no worker, then one starts", people, 3, during=start_worker_late)
    run.assert_clean()


async def test_servers_restarted_under_load(cluster: Cluster, model: ModelServer) -> None:
    """SIGKILL one server and SIGTERM the other, each restarted on its port, while 12 sessions
    chat: the clients reconnect (to whichever server answers) and resync from the history;
    every reply is stored once and no socket gets another session's events."""
    model.behaviour.token_delay = 0.05
    await asyncio.gather(cluster.add_server(), cluster.add_server())
    await asyncio.gather(cluster.add_worker(), cluster.add_worker())
    restarts: list[str] = []

    async def restart_servers(done: asyncio.Event) -> None:
        await asyncio.sleep(0.8)
        first = cluster.servers[0]
        cluster.kill(first)
        restarts.append(f"SIGKILL {first.name}")
        await asyncio.sleep(0.5)
        await cluster.add_server(first.port)
        await asyncio.sleep(0.5)
        second = cluster.servers[0]
        code = await cluster.terminate(second)
        restarts.append(f"SIGTERM {second.name} (exit {code})")
        await cluster.add_server(second.port)
        done_early.append(done.is_set())

    done_early: list[bool] = []
    people = users(12, cluster, gap=0.6)
    run = await drive("server SIGKILL + SIGTERM, restarted", people, 8, during=restart_servers)
    run.notes = "; ".join(restarts)
    # Replies finished while a client was away reach it through the history, by design.
    run.assert_clean(history_only=False)
    assert done_early == [False], "the load ended before the faults"
    assert run.reconnects >= len(people), "every client had a socket on a restarted server"
