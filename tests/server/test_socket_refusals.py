"""What the socket additions do when Redis refuses them: a real Redis whose ACL denies the
server JSON.GET (as a misconfigured managed Redis would), so reading the document fails while
everything else works."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis
from websockets.exceptions import InvalidStatus

from core.config import Settings
from server.api.errors import REDIS_UNAVAILABLE
from tests.support.model_servers import ModelServer
from tests.support.stack import Stack, running_stack


@pytest.fixture
async def denied_stack(
    redis: Redis, stack_settings: Settings, model_server: ModelServer
) -> AsyncIterator[Stack]:
    """The stack, its server and worker logged in as a user that may not run JSON.GET."""
    user, password = f"nojsonget-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-json.get"],
    )
    parts = urlsplit(stack_settings.redis_url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
    url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    try:
        async with running_stack(stack_settings.model_copy(update={"redis_url": url})) as stack:
            yield stack
    finally:
        await redis.acl_deluser(user)


async def test_history_that_cannot_be_read_refuses_the_handshake_with_503(
    denied_stack: Stack,
) -> None:
    token = await denied_stack.new_session()
    with pytest.raises(InvalidStatus) as refused:
        async with denied_stack.socket(token, "&history=1"):
            pass
    response = refused.value.response
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert REDIS_UNAVAILABLE in response.body.decode()
    async with denied_stack.socket(token) as chat:  # without history it opens
        await chat.send("/help")
        assert (await chat.next_event())["type"] == "command"


async def test_a_reset_redis_refuses_is_service_unavailable(denied_stack: Stack) -> None:
    token = await denied_stack.new_session()
    async with denied_stack.socket(token) as chat:
        await chat.send('{"type": "message", "msg": "/reset", "client_id": "r1"}')
        error = await chat.next_event()
        await chat.send("/help")
        still_open = await chat.next_event()
    assert error["type"] == "error" and error["code"] == "service_unavailable"
    assert error["client_id"] == "r1"
    assert still_open["command"] == "help"
