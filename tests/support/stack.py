"""The service run inside the test's event loop: the real app on a real port, real workers.

For tests that need separate processes (two servers, SIGKILL), see tests/support/processes.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from core.config import Settings
from core.keys import Keys
from server.__main__ import WS_MAX_FRAME_BYTES
from server.main import create_app
from tests.support.asgi_server import InProcessServer
from worker.worker import Worker

FINAL = ("message", "error")


@dataclass
class Stack:
    settings: Settings
    server: InProcessServer
    workers: list[tuple[Worker, asyncio.Task[None]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def keys(self) -> Keys:
        """The Redis names the stack's server uses: its store's own, not a copy rebuilt from
        the settings that could drift from it (core/keys.py owns them)."""
        keys: Keys = self.server.app.state.services.store.keys
        return keys

    def add_worker(self) -> Worker:
        worker = Worker(self.settings)
        self.workers.append((worker, asyncio.create_task(worker.run())))
        return worker

    async def stop_workers(self) -> None:
        for worker, _ in self.workers:
            worker.request_shutdown()
        await asyncio.gather(*(task for _, task in self.workers))
        self.workers.clear()

    async def new_session(self, name: str = "Ann") -> str:
        async with httpx.AsyncClient(base_url=self.url) as client:
            response = await client.post("/token", params={"name": name})
            response.raise_for_status()
            token: str = response.json()["token"]
            return token

    async def history(self, token: str) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url) as client:
            response = await client.get("/refresh_token", params={"token": token})
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    @asynccontextmanager
    async def socket(self, token: str, query: str = "") -> AsyncIterator[ChatSocket]:
        """A socket of session `token`; `query` adds parameters ("&history=1")."""
        async with websockets.connect(f"{self.server.ws_url}/chat?token={token}{query}") as ws:
            yield ChatSocket(ws)


class ChatSocket:
    """A client socket that keeps every event it receives, for assertions."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def next_event(self, timeout: float = 10.0) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.events.append(event)
        return event

    async def until(self, *types: str, timeout: float = 15.0) -> dict[str, Any]:
        """Receive until an event of one of `types` arrives; returns it."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next_event(timeout)
                if event["type"] in types:
                    return event

    async def finals(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Receive until `count` final events (reply or error) have arrived."""
        found: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while len(found) < count:
                event = await self.next_event(timeout)
                if event["type"] in FINAL:
                    found.append(event)
        return found

    async def silence(self, seconds: float) -> list[dict[str, Any]]:
        """Whatever arrives within `seconds` (expected: nothing)."""
        extra: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(seconds):
                while True:
                    extra.append(await self.next_event(seconds))
        except TimeoutError:
            return extra


@asynccontextmanager
async def running_stack(settings: Settings, *, workers: int = 1) -> AsyncIterator[Stack]:
    async with InProcessServer(create_app(settings), ws_max_size=WS_MAX_FRAME_BYTES) as server:
        stack = Stack(settings, server)
        try:
            started = [stack.add_worker() for _ in range(workers)]
            # Ready when its workers are counted alive: a message sent sooner gets a `queued`
            # notice (true, but not what most tests are about).
            await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in started)), 30)
            yield stack
        finally:
            await stack.stop_workers()
