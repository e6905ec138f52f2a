"""Accounts (API v1) over HTTP, against the real stack: registering, the key, who may
register, and the registration rate limit."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from core.accounts import key_hash
from core.config import Settings
from tests.conftest import make_settings
from tests.support.accounts import auth, register
from tests.support.model_servers import ModelServer
from tests.support.stack import Stack, running_stack

MASTER = "m" * 40


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        yield client


async def test_registering_shows_the_key_once_and_it_opens_the_account(
    http: httpx.AsyncClient, redis: Redis, stack_settings: Settings
) -> None:
    response = await http.post("/v1/users", json={"name": "  Ann  "})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"user_id", "name", "created", "api_key"} and body["name"] == "Ann"
    assert datetime.fromisoformat(body["created"]).utcoffset() is not None
    me = await http.get("/v1/users/me", headers=auth(body["api_key"]))
    assert me.status_code == 200
    assert me.json() == {key: body[key] for key in ("user_id", "name", "created")}
    seed = await http.get("/v1/users/me", headers={"ACCESS-TOKEN": body["api_key"]})
    assert seed.json()["user_id"] == body["user_id"]
    stored: Any = await redis.hgetall(f"{stack_settings.key_prefix}:user:{{{body['user_id']}}}")
    assert body["api_key"] not in stored.values()
    assert stored["key_hash"] == key_hash(body["api_key"])


async def test_me_refuses_no_key_a_wrong_one_and_a_conversation_token(
    http: httpx.AsyncClient,
) -> None:
    _, key = await register(http)
    token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
    for headers, status in (
        ({}, 401),
        (auth(key[:-1] + ("A" if key[-1] != "A" else "B")), 401),
        ({"Authorization": f"Basic {key}"}, 401),
        (auth(token), 401),
    ):
        response = await http.get("/v1/users/me", headers=headers)
        assert response.status_code == status, headers
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "Enter a valid name"),
        (" \u200b ", "Enter a valid name"),
        ("x" * 101, "at most 100 characters"),
        ("a\x00b", "no control characters"),
    ],
)
async def test_the_name_rules_of_token(http: httpx.AsyncClient, name: str, reason: str) -> None:
    response = await http.post("/v1/users", json={"name": name})
    assert response.status_code == 400
    assert response.json()["detail"]["loc"] == "name" and reason in response.json()["detail"]["msg"]
    assert (await http.post("/v1/users", json={})).status_code == 422
    assert (await http.post("/v1/users", json={"name": 5})).status_code == 422


@pytest.mark.parametrize("token", [None, MASTER])
async def test_registration_admin_needs_the_master_token(
    redis_url: str, model_server: ModelServer, token: str | None
) -> None:
    settings = make_settings(
        redis_url,
        openai_base_url=model_server.openai_base_url,
        registration="admin",
        master_token=token,
    )
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        for headers in ({}, auth("wrong"), auth(MASTER[:-1]), {"MASTER-TOKEN": MASTER + "x"}):
            refused = await http.post("/v1/users", json={"name": "Ann"}, headers=headers)
            assert refused.status_code == 403, headers
            assert "master token" in refused.json()["detail"]
        for headers in (auth(MASTER), {"MASTER-TOKEN": MASTER}):
            made = await http.post("/v1/users", json={"name": "Ann"}, headers=headers)
            assert made.status_code == (201 if token else 403)


async def test_registration_is_rate_limited_per_address(
    redis_url: str, model_server: ModelServer
) -> None:
    settings = make_settings(
        redis_url, openai_base_url=model_server.openai_base_url, rate_limit_register_requests=2
    )
    async with (
        running_stack(settings, workers=0) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        for _ in range(2):
            assert (await http.post("/v1/users", json={"name": "Ann"})).status_code == 201
        refused = await http.post("/v1/users", json={"name": "Ann"})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["detail"].startswith("Too many requests")
        # /token keeps its own budget.
        assert (await http.post("/token", params={"name": "Ann"})).status_code == 200


TRICKY_NAMES = [
    "Ann",
    "  Ann\t\n",
    "\x1dAnn\x1f",
    "\u3000Ann\u2028",
    "a\x85b",
    "\x85Ann",
    "\u200bAnn",
    "\u200b\u200c",
    "\ufeff",
    "x" * 100,
    "  " + "x" * 100 + "  ",
    "x" * 101,
    "a\u00a0b",
    "💡",
    "a\ufffd",
    "",
]


async def test_the_schemas_name_pattern_says_what_the_server_accepts(
    http: httpx.AsyncClient,
) -> None:
    schema = (await http.get("/openapi.json")).json()
    pattern = schema["components"]["schemas"]["UserCreate"]["properties"]["name"]["pattern"]
    for name in TRICKY_NAMES:
        accepted = (await http.post("/v1/users", json={"name": name})).status_code == 201
        assert accepted == bool(re.fullmatch(pattern, name)), repr(name)
