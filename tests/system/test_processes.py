"""The service as separate processes: two servers and two workers against one real Redis.

The model is the local OpenAI-compatible protocol server, run in the test's event loop and
reached by the workers over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import websockets

from core.config import Settings
from core.keys import Keys
from core.redis import connect_redis
from tests.conftest import make_settings
from tests.support.model_servers import ModelServer, ModelServerBehaviour
from tests.support.processes import ServerChild, WorkerChild, settings_env

pytestmark = pytest.mark.slow

ChildT = TypeVar("ChildT", ServerChild, WorkerChild)


@pytest.fixture
async def slow_model() -> AsyncIterator[ModelServer]:
    async with ModelServer(ModelServerBehaviour(token_delay=0.01)) as server:
        yield server


@pytest.fixture
def system_settings(any_redis_url: str, slow_model: ModelServer) -> Settings:
    return make_settings(any_redis_url, openai_base_url=slow_model.openai_base_url)


@pytest.fixture
def servers(system_settings: Settings, tmp_path: Path) -> Iterator[list[ServerChild]]:
    yield from started(ServerChild, "server", settings_env(system_settings), tmp_path)


@pytest.fixture
def workers(system_settings: Settings, tmp_path: Path) -> Iterator[list[WorkerChild]]:
    yield from started(WorkerChild, "worker", settings_env(system_settings), tmp_path)


def started(
    kind: type[ChildT], name: str, env: dict[str, str], log_dir: Path
) -> Iterator[list[ChildT]]:
    """Two processes of a kind, ready, and stopped afterwards."""
    children = [kind(f"{name}{n}", env, log_dir) for n in (1, 2)]
    try:
        for child in children:
            child.wait_ready()
        yield children
    finally:
        for child in children:
            child.stop()


async def new_session(server: ServerChild, name: str) -> str:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/token", params={"name": name})
        response.raise_for_status()
        token: str = response.json()["token"]
        return token


async def history(server: ServerChild, token: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/refresh_token", params={"token": token})
        response.raise_for_status()
        messages: list[dict[str, Any]] = response.json()["messages"]
        return messages


async def receive_until_finals(ws: Any, count: int, timeout: float) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    finals = 0
    async with asyncio.timeout(timeout):
        while finals < count:
            event = json.loads(await ws.recv())
            events.append(event)
            finals += event["type"] in ("message", "error")
    return events


def assert_exactly_once_in_order(messages: list[dict[str, Any]], sent: list[str]) -> None:
    humans = [m for m in messages if m["source"] == "human"]
    assert [h["msg"] for h in humans] == sent
    replies: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        if m["source"] == "bot":
            replies.setdefault(m["reply_to"], []).append(m)
    for human in humans:
        answers = replies.get(human["id"], [])
        assert len(answers) == 1, f"{human['msg']!r} answered {len(answers)} times"
        assert answers[0]["msg"] == f"echo: {human['msg']}"
    # Each reply is stored after the message it answers and after the previous reply.
    positions = {m["id"]: i for i, m in enumerate(messages)}
    reply_positions = [positions[replies[h["id"]][0]["id"]] for h in humans]
    assert reply_positions == sorted(reply_positions)


SESSIONS = 20
MESSAGES = 5


async def test_many_sessions_over_two_servers_and_two_workers(
    servers: list[ServerChild], workers: list[WorkerChild]
) -> None:
    async def one_session(n: int) -> None:
        home, away = servers[n % 2], servers[(n + 1) % 2]
        token = await new_session(home, f"user{n}")
        sent = [f"session {n} message {m}" for m in range(MESSAGES)]
        async with (
            websockets.connect(f"{home.ws_url}/chat?token={token}") as ws,
            websockets.connect(f"{away.ws_url}/chat?token={token}") as second_tab,
        ):
            for text in sent:
                await ws.send(text)
            events = await receive_until_finals(ws, MESSAGES, timeout=60)
            tab_events = await receive_until_finals(second_tab, MESSAGES, timeout=10)
        for received in (events, tab_events):
            acks = [e for e in received if e["type"] == "ack"]
            finals = [e for e in received if e["type"] in ("message", "error")]
            assert [a["msg"] for a in acks] == sent
            # One final reply per message, in the order sent, and only this session's.
            assert [f["type"] for f in finals] == ["message"] * MESSAGES
            assert [f["reply_to"] for f in finals] == [a["id"] for a in acks]
            assert [f["msg"] for f in finals] == [f"echo: {t}" for t in sent]
            own_ids = {a["id"] for a in acks}
            assert all(e["reply_to"] in own_ids for e in received if e["type"] == "token")
        assert_exactly_once_in_order(await history(away, token), sent)

    await asyncio.gather(*(one_session(n) for n in range(SESSIONS)))


async def test_worker_killed_mid_generation_is_replaced_once(
    servers: list[ServerChild],
    workers: list[WorkerChild],
    slow_model: ModelServer,
    system_settings: Settings,
) -> None:
    slow_model.behaviour.token_delay = 0.15
    server = servers[0]
    token = await new_session(server, "victim")
    sent = ["one two three four five six seven eight nine ten", "and after that?"]
    async with websockets.connect(f"{server.ws_url}/chat?token={token}") as ws:
        await ws.send(sent[0])
        await ws.send(sent[1])
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while not any(e["type"] == "token" for e in events):
                events.append(json.loads(await ws.recv()))
        # The worker generating now is the one whose consumer holds a pending entry.
        keys = Keys.from_settings(system_settings)
        redis = await connect_redis(system_settings)
        try:
            pending = await redis.xpending_range(
                keys.requests_for(token), keys.group, min="-", max="+", count=10
            )
        finally:
            await redis.aclose()
        holders = {str(p["consumer"]) for p in pending}
        victim = next(w for w in workers if any(f"-{w.pid}-" in c for c in holders))
        victim.kill()
        events += await receive_until_finals(ws, 2, timeout=30)

    finals = [e for e in events if e["type"] in ("message", "error")]
    assert [f["msg"] for f in finals] == [f"echo: {t}" for t in sent]
    assert_exactly_once_in_order(await history(server, token), sent)
    survivor = next(w for w in workers if w is not victim)
    assert "reclaimed" in survivor.log()
