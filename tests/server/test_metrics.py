"""/metrics on the server: the numbers move with real traffic through the in-process stack
(server and worker in this process, the OpenAI-compatible test model server)."""

from __future__ import annotations

import httpx
from redis.asyncio import Redis

from core.config import Settings
from core.metrics import QueueCollector, render, serving_registry
from core.redis import connect_redis, ensure_group
from core.store import SessionStore
from launcher.redis_cluster import EmbeddedCluster
from launcher.redis_server import free_port
from tests.conftest import make_settings
from tests.support import sessions
from tests.support.metrics import Samples, parse, scrape, until, value
from tests.support.model_servers import HttpError, ModelServer
from tests.support.stack import running_stack

FIRST_TOKEN_COUNT = "chat_first_token_seconds_count"
REPLY_COUNT = "chat_reply_seconds_count"


def counts(samples: Samples) -> dict[str, float]:
    return {
        "received": value(samples, "chat_messages_received_total"),
        "answered": value(samples, "chat_replies_total", outcome="answered"),
        "first_token": value(samples, FIRST_TOKEN_COUNT),
        "reply": value(samples, REPLY_COUNT),
    }


async def test_counters_histograms_and_sockets_move_with_traffic(stack_settings: Settings) -> None:
    async with running_stack(stack_settings) as stack:
        url = f"{stack.url}/metrics"
        before = counts(await scrape(url))
        sockets_before = value(await scrape(url), "chat_sockets_open")
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            during = await until(url, lambda s: value(s, "chat_sockets_open") > sockets_before)
            for n in range(3):
                await chat.send(f"number {n}")
            await chat.finals(3)
        after = await until(url, lambda s: counts(s)["reply"] >= before["reply"] + 3)
        closed = await until(url, lambda s: value(s, "chat_sockets_open") == sockets_before)
    assert value(during, "chat_sockets_open") == sockets_before + 1
    moved = {name: after_value - before[name] for name, after_value in counts(after).items()}
    assert moved == {"received": 3, "answered": 3, "first_token": 3, "reply": 3}
    assert value(closed, "chat_sockets_open") == sockets_before
    assert value(after, "chat_generations_in_flight") == 0


async def test_a_failing_model_counts_model_errors_by_code(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = make_settings(redis_url, openai_base_url=model_server.openai_base_url)
    model_server.behaviour.script = [HttpError(401, "Invalid credentials")]
    async with running_stack(settings) as stack:
        url = f"{stack.url}/metrics"
        before = await scrape(url)
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            await chat.send("this one fails")
            error = await chat.until("error")
        code = error["code"]

        def moved(samples: Samples) -> bool:
            return value(samples, "chat_replies_total", outcome=code) > value(
                before, "chat_replies_total", outcome=code
            )

        after = await until(url, moved)
    assert code == "model_error"
    for name, label in (("chat_model_errors_total", "code"), ("chat_replies_total", "outcome")):
        assert value(after, name, **{label: code}) == value(before, name, **{label: code}) + 1


async def test_queue_waiting_is_read_from_redis_and_drains(
    stack_settings: Settings, redis: Redis
) -> None:
    async with running_stack(stack_settings, workers=0) as stack:
        url = f"{stack.url}/metrics"
        empty = await scrape(url)
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            for n in range(3):
                await chat.send(f"waiting {n}")
            for _ in range(3):
                await chat.until("ack")
            queued = await scrape(url)
            stack.add_worker()
            await chat.finals(3)
        drained = await until(url, lambda s: value(s, "chat_queue_pending") == 0)
    assert (value(empty, "chat_queue_waiting"), value(empty, "chat_queue_pending")) == (0, 0)
    assert value(queued, "chat_queue_waiting") == 3
    assert (value(drained, "chat_queue_waiting"), value(drained, "chat_queue_pending")) == (0, 0)


async def test_metrics_can_be_kept_off_the_public_port(redis_url: str) -> None:
    for overrides in ({"server_metrics_port": 9999}, {"metrics_enabled": False}):
        settings = make_settings(redis_url, **overrides)
        async with running_stack(settings, workers=0) as stack, httpx.AsyncClient() as client:
            response = await client.get(f"{stack.url}/metrics")
        assert response.status_code == 404, overrides


async def test_a_stopped_reply_is_counted_as_stopped(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = make_settings(redis_url, openai_base_url=model_server.openai_base_url)
    model_server.behaviour.token_delay = 0.5  # slow enough to be stopped mid-reply
    async with running_stack(settings) as stack:
        url = f"{stack.url}/metrics"
        before = value(await scrape(url), "chat_replies_total", outcome="stopped")
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            await chat.send("a long answer, please")
            await chat.until("token")
            await chat.send('{"type": "stop"}')
            reply = await chat.until("message")
        after = await until(
            url, lambda s: value(s, "chat_replies_total", outcome="stopped") > before
        )
    assert reply.get("stopped") is True
    assert value(after, "chat_replies_total", outcome="stopped") == before + 1


async def test_a_scrape_without_redis_still_answers_without_the_queue_gauges(
    redis_url: str,
) -> None:
    collector = QueueCollector(make_settings(f"redis://127.0.0.1:{free_port()}/0"))
    try:
        text = render(serving_registry(collector)).decode()
    finally:
        collector.close()
    assert "chat_messages_received_total" in text
    assert "chat_queue_waiting" not in text


async def test_the_queue_gauges_count_every_partition_of_a_cluster(
    redis_cluster: EmbeddedCluster,
) -> None:
    settings = make_settings(redis_cluster.url)
    redis = await connect_redis(settings)
    store = SessionStore(redis, settings)
    try:
        await ensure_group(redis, store.keys)
        for n in range(6):  # six sessions: spread over the partitions, so over the masters
            session = await store.create(f"user{n}")
            await sessions.add_human_message(store, session.token, "waiting")
    finally:
        await redis.aclose()
    collector = QueueCollector(settings)
    try:
        samples = parse(render(serving_registry(collector)).decode())
    finally:
        collector.close()
    assert value(samples, "chat_queue_waiting") == 6
    assert value(samples, "chat_queue_pending") == 0
