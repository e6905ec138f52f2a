"""core/autopipeline.py against a real Redis: calls made while another is on its way go
together as one pipeline, and each caller still gets exactly what it would have got alone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from core.autopipeline import AutoPipeline
from core.config import Settings
from core.models import DeltaEvent, new_id
from core.store import SessionStore
from tests.support.redis_stats import command_calls

ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The size of every pipeline redis-py executes from now on."""
    sizes: list[int] = []
    execute = Pipeline.execute

    async def counted(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        sizes.append(len(self.command_stack))
        return await execute(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", counted)
    yield sizes


async def test_calls_made_while_one_is_on_its_way_go_as_one_pipeline(
    redis: Redis, pipelines: list[int]
) -> None:
    """The first of 30 concurrent calls goes at once, alone; the 29 made meanwhile go
    together when it is back, each with its own reply."""
    auto = AutoPipeline(redis)
    script = redis.register_script(ECHO)
    await redis.script_load(ECHO)
    replies = await asyncio.gather(*(auto.script(script, [f"k{i}"], [i]) for i in range(30)))
    assert replies == [[f"k{i}", str(i)] for i in range(30)]
    assert pipelines == [29]


async def test_a_lone_call_is_sent_as_it_is(redis: Redis, pipelines: list[int]) -> None:
    auto = AutoPipeline(redis)
    assert await auto.command("ECHO", "one") == "one"
    assert await auto.command("ECHO", "two") == "two"
    assert pipelines == []


async def test_a_failing_call_fails_only_its_caller(redis: Redis) -> None:
    key = f"test-auto-{uuid.uuid4().hex}"
    await redis.set(key, "not a list")
    auto = AutoPipeline(redis)
    outcomes: tuple[Any, ...] = await asyncio.gather(
        auto.command("ECHO", "a"), auto.command("LPUSH", key, "x"), auto.command("ECHO", "b"),
        return_exceptions=True,
    )  # fmt: skip
    ok, wrong, also_ok = outcomes
    assert (ok, also_ok) == ("a", "b")
    assert isinstance(wrong, ResponseError) and "WRONGTYPE" in str(wrong)


async def test_a_script_redis_lost_is_loaded_once_and_run_again(
    redis: Redis, pipelines: list[int]
) -> None:
    """After SCRIPT FLUSH (as after a restart, or a failover), the calls that met NOSCRIPT in
    the pipeline are run again, together, once their script is loaded (once)."""
    auto = AutoPipeline(redis)
    script = redis.register_script(ECHO + " -- " + uuid.uuid4().hex)
    await redis.script_flush()
    loads = await command_calls(redis, "script|load")
    # A call on its way for a while, so the 20 wait and then go as one pipeline.
    waiting = asyncio.ensure_future(auto.command("BLPOP", f"test-auto-{uuid.uuid4().hex}", 0.2))
    await asyncio.sleep(0)
    replies = await asyncio.gather(*(auto.script(script, ["k"], [i]) for i in range(20)))
    assert await waiting is None
    assert replies == [["k", str(i)] for i in range(20)]
    assert await command_calls(redis, "script|load") == loads + 1
    assert pipelines == [20, 20]


async def test_a_call_cancelled_while_it_waits_is_not_sent(redis: Redis) -> None:
    key = f"test-auto-{uuid.uuid4().hex}"
    auto = AutoPipeline(redis)
    calls = [asyncio.ensure_future(auto.command("INCR", key)) for _ in range(3)]
    await asyncio.sleep(0)  # the first is on its way, the other two wait for it
    calls[1].cancel()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert sorted(x for x in done if isinstance(x, int)) == [1, 2]
    assert await redis.get(key) == "2"
    await redis.delete(key)


async def test_a_lost_connection_fails_every_call_of_the_pipeline() -> None:
    refused = Redis(port=1, socket_connect_timeout=0.5, retry_on_error=[], decode_responses=True)
    auto = AutoPipeline(refused)
    try:
        outcomes = await asyncio.gather(
            *(auto.command("ECHO", str(i)) for i in range(4)), return_exceptions=True
        )
    finally:
        await refused.aclose()
    assert all(isinstance(x, RedisConnectionError) for x in outcomes)


async def test_on_a_cluster_calls_go_one_by_one(redis_cluster: Any, pipelines: list[int]) -> None:
    cluster = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        auto = AutoPipeline(cluster)
        script = cluster.register_script(ECHO)
        keys = [f"{{p{i}}}k" for i in range(6)]  # several slots, so several masters
        # Loaded on every master first: concurrent first calls of a script no master knows
        # once made redis-py's cluster client fail one of them inside its own reload.
        await cluster.script_load(ECHO)
        replies = await asyncio.gather(*(auto.script(script, [k], [1]) for k in keys))
    finally:
        await cluster.aclose()
    assert replies == [[k, "1"] for k in keys]
    assert pipelines == []


async def test_the_store_sends_concurrent_turn_reads_and_pieces_together(
    store: SessionStore, settings: Settings, pipelines: list[int]
) -> None:
    """What many sessions do at once in the worker, a read for each turn and a `token`
    event for each reply, costs one call and then one pipeline, not a round trip each."""
    sessions = [await store.create(f"user {i}") for i in range(8)]
    reads = await asyncio.gather(*(store.recent_messages(s.token, 10) for s in sessions))
    assert all(read is not None and read.messages == [] for read in reads)
    piece = DeltaEvent(id=new_id(), reply_to=new_id(), delta="hello")
    await asyncio.gather(*(store.publish_delta(s.token, piece) for s in sessions))
    assert pipelines[-2:] == [7, 7]
