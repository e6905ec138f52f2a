"""Shortcuts for the API v1 tests: register an account over HTTP, and its auth header."""

from __future__ import annotations

from typing import Any

import httpx


def auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def register(http: httpx.AsyncClient, name: str = "Ann") -> tuple[str, str]:
    """A new account through `POST /v1/users`: (user_id, api_key)."""
    response = await http.post("/v1/users", json={"name": name})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body["user_id"], body["api_key"]
