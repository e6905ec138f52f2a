"""Hostile environments for the workers: Redis refusing writes mid-load (OOM, READONLY after a
failover, MISCONF after a failed save), and one session bursting while others chat.

Real server and worker processes, a Redis of the test's own (its config is changed), users that
reconnect and resend like real clients (tests/support/chat_client.py). Every message must be
answered exactly once (tests/support/ledger.py's tally); the row says what the clients saw.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import websockets
from redis.asyncio import Redis

from core.config import Settings
from core.redis import create_redis
from launcher.redis_server import EmbeddedRedis, free_port
from tests.conftest import make_settings
from tests.support.chat_client import ChatUser
from tests.support.cluster import Cluster, drive, fault_env, users
from tests.support.hostile import HostileRun, record
from tests.support.model_servers import ModelServer, ModelServerBehaviour

pytestmark = pytest.mark.slow

REFUSING = 3.0  # seconds Redis refuses writes for, mid-load


@pytest.fixture
async def model() -> AsyncIterator[ModelServer]:
    async with ModelServer(ModelServerBehaviour(token_delay=0.03)) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(  # `dir` is a protected config
        free_port(), tmp_path / "redis", extra_args=["--enable-protected-configs", "yes"]
    )
    with server:
        yield server


def saw(people: list[ChatUser]) -> str:
    codes: Counter[str] = Counter()
    for user in people:
        for log in user.sockets:
            for event in log.events:
                if event["type"] == "error" and not event.get("reply_to"):
                    codes[str(event.get("code"))] += 1
    return ", ".join(f"{n} {code}" for code, n in codes.most_common()) or "nothing unusual"


async def refusal_row(
    case: str,
    settings: Settings,
    tmp_path: Path,
    refuse: Callable[[Redis], Awaitable[None]],
    clear: Callable[[Redis], Awaitable[None]],
) -> None:
    cluster = Cluster(fault_env(settings), tmp_path / "logs")
    (tmp_path / "logs").mkdir(exist_ok=True)
    people = users(8, cluster, gap=0.3)
    figures: dict[str, str] = {}

    async def inject(done: asyncio.Event) -> None:
        async with create_redis(settings) as admin:
            await asyncio.sleep(1.0)
            await refuse(admin)
            began = time.monotonic()
            await asyncio.sleep(REFUSING)
            alive = [c.process.poll() is None for c in [*cluster.servers, *cluster.workers]]
            assert all(alive), cluster.logs()
            await clear(admin)
            figures["refused for"] = f"{time.monotonic() - began:.1f} s"

    try:
        await asyncio.gather(cluster.add_server(), cluster.add_server())
        await asyncio.gather(cluster.add_worker(), cluster.add_worker())
        run = await drive(case, people, 6, during=inject, record=False)
        assert run.lost == 0, run
        run.assert_clean(history_only=False)
        assert all(c.process.poll() is None for c in [*cluster.servers, *cluster.workers])
        worker_logs = "\n".join(w.log() for w in cluster.workers)
        figures["worker refusal log lines"] = str(worker_logs.count("Redis refused"))
        figures["resent"] = str(run.resent)
        record(
            HostileRun(
                case=case,
                load=f"{run.sessions} sessions x 6 messages, 2 servers, 2 workers",
                lost=run.lost,
                client_saw=saw(people),
                figures=figures,
                seconds=run.seconds,
            )
        )
    finally:
        cluster.stop()


async def test_out_of_memory_mid_load(
    own_redis: EmbeddedRedis, model: ModelServer, tmp_path: Path
) -> None:
    settings = make_settings(own_redis.url, openai_base_url=model.openai_base_url)

    async def refuse(admin: Redis) -> None:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")

    async def clear(admin: Redis) -> None:
        await admin.config_set("maxmemory", "0")

    await refusal_row("Redis OOM (maxmemory, noeviction)", settings, tmp_path, refuse, clear)


async def test_misconf_mid_load(
    own_redis: EmbeddedRedis, model: ModelServer, tmp_path: Path
) -> None:
    settings = make_settings(own_redis.url, openai_base_url=model.openai_base_url)
    doomed = tmp_path / "doomed"
    original: dict[str, str] = {}

    async def refuse(admin: Redis) -> None:
        original["dir"] = str((await admin.config_get("dir"))["dir"])
        await asyncio.to_thread(doomed.mkdir)
        await admin.config_set("stop-writes-on-bgsave-error", "yes")
        await admin.config_set("save", "3600 1")
        await admin.config_set("dir", str(doomed))
        await asyncio.to_thread(shutil.rmtree, doomed)
        await admin.bgsave()
        while (await admin.info("persistence"))["rdb_last_bgsave_status"] != "err":
            await asyncio.sleep(0.05)

    async def clear(admin: Redis) -> None:
        await admin.config_set("dir", original["dir"])
        while (await admin.info("persistence"))["rdb_bgsave_in_progress"]:
            await asyncio.sleep(0.05)
        await admin.bgsave()
        while (await admin.info("persistence"))["rdb_last_bgsave_status"] != "ok":
            await asyncio.sleep(0.05)

    await refusal_row("Redis MISCONF (failed BGSAVE)", settings, tmp_path, refuse, clear)


async def test_read_only_after_a_failover_mid_load(
    own_redis: EmbeddedRedis, model: ModelServer, tmp_path: Path
) -> None:
    """Every process uses one Redis; mid-load a FAILOVER makes it a replica of another (it
    answers READONLY), then that replica is promoted back (REPLICAOF NO ONE)."""
    settings = make_settings(own_redis.url, openai_base_url=model.openai_base_url)
    with EmbeddedRedis(free_port(), tmp_path / "other") as other:
        other_settings = settings.model_copy(update={"redis_url": other.url})
        async with create_redis(other_settings) as standby:
            await standby.replicaof("127.0.0.1", own_redis.port)

            async def refuse(admin: Redis) -> None:
                while (await standby.info("replication"))["master_link_status"] != "up":
                    await asyncio.sleep(0.05)
                failover = ("FAILOVER", "TO", "127.0.0.1", other.port)
                await admin.execute_command(*failover)  # type: ignore[no-untyped-call]
                while (await admin.info("replication"))["role"] != "slave":
                    await asyncio.sleep(0.05)

            async def clear(admin: Redis) -> None:
                await admin.replicaof("NO", "ONE")

            await refusal_row(
                "Redis READONLY (failover, then promoted back)", settings, tmp_path, refuse, clear
            )


# --- A burst from one session ----------------------------------------------------------------


async def first_token_latency(ws_url: str, token: str) -> float:
    """Send one message; seconds until its reply's first piece arrives."""
    async with websockets.connect(f"{ws_url}/chat?token={token}") as ws:
        started = time.monotonic()
        await ws.send(json.dumps({"type": "message", "msg": "anyone there?"}))
        async with asyncio.timeout(120):
            while True:
                event = json.loads(await ws.recv())
                if event["type"] in ("token", "message", "error") and event.get("reply_to"):
                    return time.monotonic() - started


async def test_a_burst_from_one_session_mid_load(
    redis_url: str, model: ModelServer, tmp_path: Path
) -> None:
    model.behaviour.token_delay = 0.05
    settings = make_settings(redis_url, openai_base_url=model.openai_base_url)
    env = fault_env(settings, WORKER_CONCURRENCY="2", MAX_UNANSWERED_MESSAGES="0")
    cluster = Cluster(env, tmp_path)
    try:
        server = await cluster.add_server()
        await cluster.add_worker()
        loud = users(1, cluster)[0]
        quiet = users(6, cluster)
        await asyncio.gather(loud.start(), *(q.start() for q in quiet))
        started = time.monotonic()
        async with websockets.connect(f"{server.ws_url}/chat?token={loud.token}") as burst:
            for n in range(30):
                await burst.send(json.dumps({"type": "message", "msg": f"burst {n}"}))
            await asyncio.sleep(0.5)
            latencies = sorted(
                await asyncio.gather(*(first_token_latency(server.ws_url, q.token) for q in quiet))
            )
            finals = 0
            async with asyncio.timeout(120):
                while finals < 30:
                    event = json.loads(await burst.recv())
                    finals += event["type"] in ("message", "error") and bool(event.get("reply_to"))
        p50, worst = latencies[len(latencies) // 2], latencies[-1]
        assert worst < 5.0, latencies
        record(
            HostileRun(
                case="burst from one session",
                load="30 messages at once from 1 session, 6 others send 1; 1 worker, 2 slots",
                lost=30 - finals,
                client_saw="others answered alongside the burst",
                figures={
                    "others first token p50": f"{p50 * 1000:.0f} ms",
                    "others first token max": f"{worst * 1000:.0f} ms",
                    "burst answered in": f"{time.monotonic() - started:.1f} s",
                },
                seconds=time.monotonic() - started,
            )
        )
        assert finals == 30
    finally:
        cluster.stop()
