"""HTTP routes while Redis is unreachable: a clear 503 the client can retry, not a bare 500."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from launcher.redis_server import EmbeddedRedis, free_port
from server.main import REDIS_UNAVAILABLE, create_app
from tests.conftest import make_settings
from tests.support.asgi_server import InProcessServer


async def test_session_routes_answer_503_while_redis_is_down(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as restarted:
        async with (
            InProcessServer(create_app(make_settings(restarted.url))) as served,
            httpx.AsyncClient(base_url=served.url) as http,
        ):
            token = (await http.post("/token", params={"name": "Ann"})).json()["token"]
            await asyncio.to_thread(restarted.stop)
            refused = [
                await http.post("/token", params={"name": "Bob"}),
                await http.get("/refresh_token", params={"token": token}),
            ]
            await asyncio.to_thread(restarted.start)
            after = await http.get("/refresh_token", params={"token": token})
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json() == {"detail": REDIS_UNAVAILABLE}
        assert response.headers["retry-after"] == "1"
    # The session survived the restart (AOF) and the same client connection pool recovers.
    assert after.status_code == 200
    assert after.json()["token"] == token
