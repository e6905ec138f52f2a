"""Admin routes (API v1) against the real stack: the master token, stats, users."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from core.config import Settings
from core.models import new_id
from tests.conftest import make_settings
from tests.support.accounts import auth, register
from tests.support.model_servers import ModelServer
from tests.support.stack import Stack, running_stack

MASTER = "admin-" + "s" * 30


@pytest.fixture
def stack_settings(redis_url: str, model_server: ModelServer) -> Settings:
    return make_settings(
        redis_url, openai_base_url=model_server.openai_base_url, master_token=MASTER
    )


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        yield client


ROUTES = [("GET", "/v1/admin/stats"), ("GET", "/v1/admin/users"), ("DELETE", "/v1/admin/users/x")]


async def test_without_master_token_set_there_are_no_admin_routes(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = make_settings(redis_url, openai_base_url=model_server.openai_base_url)
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        for method, path in ROUTES:
            for headers in ({}, auth(MASTER), {"MASTER-TOKEN": MASTER}):
                response = await http.request(method, path, headers=headers)
                assert response.status_code == 404, (path, headers)


@pytest.mark.parametrize(
    "headers",
    [{}, auth("wrong"), auth(MASTER[:-1]), auth(MASTER + "x"), {"MASTER-TOKEN": "wrong"}],
)
async def test_a_missing_or_wrong_master_token_is_401(
    http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    _, key = await register(http)
    for method, path in ROUTES:
        response = await http.request(method, path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.headers["www-authenticate"] == "Bearer"
        assert (await http.request(method, path, headers=auth(key))).status_code == 401


async def test_the_master_token_is_compared_in_constant_time(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert (await http.get("/v1/admin/stats", headers=auth("guess"))).status_code == 401
    assert (await http.get("/v1/admin/stats", headers={"MASTER-TOKEN": MASTER})).status_code == 200
    assert (b"guess", MASTER.encode()) in compared and (MASTER.encode(),) * 2 in compared


async def test_stats_count_sessions_sockets_workers_and_the_queue(
    http: httpx.AsyncClient, stack: Stack
) -> None:
    admin = {"MASTER-TOKEN": MASTER}
    token = await stack.new_session()
    await stack.new_session("Bob")
    async with asyncio.timeout(5):  # the worker's first heartbeat
        while (await http.get("/v1/admin/stats", headers=admin)).json()["workers_alive"] < 1:
            await asyncio.sleep(0.05)
    async with stack.socket(token), stack.socket(token):
        stats = (await http.get("/v1/admin/stats", headers=auth(MASTER))).json()
    assert stats == {
        "sessions": 2,
        "sessions_exact": True,
        "sockets_open": 2,
        "workers_alive": 1,
        "messages_waiting": 0,
        "messages_pending": 0,
        "oldest_waiting_seconds": None,
    }
    await stack.stop_workers()
    async with stack.socket(token) as socket:
        await socket.send("first")
        await socket.until("ack")
        await socket.send("second")
        await socket.until("ack")
        await asyncio.sleep(0.3)
        stats = (await http.get("/v1/admin/stats", headers=admin)).json()
    assert stats["messages_waiting"] == 2 and stats["sockets_open"] == 1
    assert 0.3 <= stats["oldest_waiting_seconds"] < 5


async def test_a_large_keyspace_is_counted_over_several_calls(
    http: httpx.AsyncClient, stack: Stack, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.stats

    monkeypatch.setattr(core.stats, "SCAN_STEPS", 1)
    monkeypatch.setattr(core.stats, "SCAN_COUNT", 10)
    store = stack.server.app.state.services.store
    for _ in range(60):
        await store.create("Ann")  # not /token: its rate limit
    admin = auth(MASTER)
    first = (await http.get("/v1/admin/stats", headers=admin)).json()
    assert first["sessions_exact"] is False and first["sessions"] < 60
    async with asyncio.timeout(10):
        while not (stats := (await http.get("/v1/admin/stats", headers=admin)).json())[
            "sessions_exact"
        ]:
            pass
    assert stats["sessions"] == 60


async def test_users_are_listed_with_a_cursor(http: httpx.AsyncClient) -> None:
    made = [(await register(http, f"u{i}"))[0] for i in range(3)]
    admin = auth(MASTER)
    first = (await http.get("/v1/admin/users", params={"limit": 2}, headers=admin)).json()
    second = (
        await http.get(
            "/v1/admin/users", params={"limit": 2, "cursor": first["next_cursor"]}, headers=admin
        )
    ).json()
    assert second["next_cursor"] is None
    listed = [user["user_id"] for user in first["users"] + second["users"]]
    assert sorted(listed) == sorted(made) and set(first["users"][0]) == {
        "user_id",
        "name",
        "created",
    }
    bad = await http.get("/v1/admin/users", params={"cursor": made[0]}, headers=admin)
    assert bad.status_code == 400


async def test_deleting_a_user_revokes_the_key_and_deletes_every_conversation(
    http: httpx.AsyncClient, stack: Stack, redis: Redis
) -> None:
    user_id, key = await register(http)
    _, other = await register(http, "Bob")
    tokens = [
        (await http.post("/v1/conversations", json={}, headers=auth(key))).json()["token"]
        for _ in range(3)
    ]
    kept = (await http.post("/v1/conversations", json={}, headers=auth(other))).json()["token"]
    async with stack.socket(tokens[0]) as socket:
        deleted = await http.delete(f"/v1/admin/users/{user_id}", headers=auth(MASTER))
        assert deleted.status_code == 204
        assert await socket.until("conversation") == {"type": "conversation", "change": "deleted"}
    assert (await http.get("/v1/users/me", headers=auth(key))).status_code == 401
    keys = stack.keys
    for token in tokens:
        assert not await redis.exists(keys.session(token))
    assert not await redis.exists(keys.user_conversations(user_id))
    assert not await redis.exists(keys.user(user_id))
    assert await redis.exists(keys.session(kept))
    again = await http.delete(f"/v1/admin/users/{user_id}", headers=auth(MASTER))
    assert again.status_code == 404 and again.json() == {"detail": "User not found"}
    for unknown in (new_id(), "not-a-uuid"):
        missing = await http.delete(f"/v1/admin/users/{unknown}", headers=auth(MASTER))
        assert missing.status_code == 404


async def test_a_delete_cut_short_after_the_revocation_is_finished_by_a_repeat(
    http: httpx.AsyncClient, stack: Stack, redis: Redis
) -> None:
    user_id, key = await register(http)
    token = (await http.post("/v1/conversations", json={}, headers=auth(key))).json()["token"]
    await stack.server.app.state.services.accounts.revoke(user_id)  # the crash came here
    finished = await http.delete(f"/v1/admin/users/{user_id}", headers=auth(MASTER))
    assert finished.status_code == 204
    assert not await redis.exists(stack.keys.session(token))
