"""A chat user that behaves like a real client under faults, for the fault suite.

It follows docs/protocol.md "Recovering after a disconnect": when its socket closes (or cannot
open), it reconnects with backoff (to any live server), calls `GET /refresh_token` and merges
the history by id. It sends one message at a time and waits for the message's `ack`; a message
whose ack never came (socket lost, `service_unavailable`) is looked up in the history and sent
again only if it is not there. Everything each socket received is kept for the ledger
(tests/support/ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

logger = logging.getLogger(__name__)

FINAL = ("message", "error")
#: Socket-level errors after which a message was not stored.
REFUSED = ("service_unavailable", "rate_limited")


class SessionGone(Exception):
    """The server says the session does not exist (400 / 403): the fault lost it."""


@dataclass
class SocketLog:
    """One socket's life: the server it went to, every event it received, how it closed."""

    url: str
    events: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None


class ChatUser:
    """One session: `await user.start()`, then `await user.run(texts)`.

    `servers` returns the base URLs (http://host:port) of the servers to try, in order of
    preference; it is called at every (re)connection, so a test can change the set.
    """

    def __init__(
        self,
        name: str,
        servers: Callable[[], Sequence[str]],
        *,
        gap: float = 0.0,
        deadline: float = 120.0,
    ) -> None:
        self.name = name
        self._servers = servers
        self._turn = 0
        self.gap = gap
        self.deadline = deadline
        self.token = ""
        self.texts: list[str] = []
        self.sockets: list[SocketLog] = []
        #: Message id of each text, once it is known to be stored (by its ack or the history).
        self.ids: dict[str, str] = {}
        #: Merged view of the session: every message seen in a history, by id.
        self.history: dict[str, dict[str, Any]] = {}
        #: Final events (message / error with reply_to) received, by reply_to.
        self.finals: dict[str, dict[str, Any]] = {}
        #: Texts that were acknowledged and later missing from the stored history.
        self.vanished: set[str] = set()
        self.finished_at = 0.0
        self.unavailable = 0
        self.retry_after = 0.2
        self.reconnects = 0
        self.resent = 0
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # --- HTTP ----------------------------------------------------------------------------------

    def _next_server(self) -> str:
        servers = list(self._servers())
        assert servers, "no server to connect to"
        url = servers[self._turn % len(servers)]
        self._turn += 1
        return url

    async def _http(self, method: str, path: str, **params: str) -> dict[str, Any]:
        """One request, retried on other servers (with backoff) until one answers."""
        delay = 0.1
        async with asyncio.timeout(self.deadline):
            while True:
                url = self._next_server()
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                        response = await client.request(method, path, params=params)
                except httpx.HTTPError:
                    response = None
                if response is not None:
                    if response.status_code == 400 and path == "/refresh_token":
                        raise SessionGone(f"{self.name}: {response.text}")
                    if response.status_code == 200:
                        body: dict[str, Any] = response.json()
                        return body
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def start(self) -> None:
        session = await self._http("POST", "/token", name=self.name)
        self.token = session["token"]

    async def refresh(self) -> set[str]:
        """Merge the stored history into what this client knows; returns the stored ids."""
        session = await self._http("GET", "/refresh_token", token=self.token)
        for message in session["messages"]:
            self.history[message["id"]] = message
            if message["source"] == "human" and message["msg"] in self.texts:
                self.ids.setdefault(message["msg"], message["id"])
        self._changed.set()
        return {message["id"] for message in session["messages"]}

    # --- Socket --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def _connect(self) -> None:
        """Open a socket (retrying with backoff), then reload the history: in this order, no
        event is missed."""
        delay = 0.1
        while True:
            url = self._next_server()
            ws_url = url.replace("http://", "ws://", 1) + f"/chat?token={self.token}"
            try:
                ws = await asyncio.wait_for(websockets.connect(ws_url, open_timeout=10), 15)
            except InvalidStatus as exc:
                if exc.response.status_code == 403:
                    raise SessionGone(f"{self.name}: socket refused") from exc
                ws = None
            except (OSError, InvalidHandshake, TimeoutError):
                ws = None
            if ws is not None:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        log = SocketLog(url)
        self.sockets.append(log)
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws, log), name=f"{self.name}-reader")
        if len(self.sockets) > 1:
            self.reconnects += 1
        await self.refresh()

    async def _read(self, ws: ClientConnection, log: SocketLog) -> None:
        try:
            async for frame in ws:
                event: dict[str, Any] = json.loads(frame)
                log.events.append(event)
                if event["type"] in FINAL and event.get("reply_to"):
                    self.finals.setdefault(event["reply_to"], event)
                elif event["type"] == "ack" and event.get("msg") in self.texts:
                    self.ids.setdefault(event["msg"], event["id"])
                elif event["type"] == "error" and event.get("code") in REFUSED:
                    # Not stored: send it again (after `retry_after` when rate limited).
                    self.unavailable += 1
                    self.retry_after = float(event.get("retry_after") or 0.2)
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            log.close_code = ws.close_code
            self._changed.set()

    async def _ensure_connected(self) -> None:
        if not self.connected:
            await self._disconnect()
            await self._connect()

    async def _disconnect(self) -> None:
        ws, reader, self._ws, self._reader = self._ws, self._reader, None, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _wait_change(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # --- Running -------------------------------------------------------------------------------

    def answered(self, message_id: str) -> bool:
        if message_id in self.finals:
            return True
        return any(m.get("reply_to") == message_id for m in self.history.values())

    async def run(self, texts: Sequence[str]) -> None:
        """Send every text (one at a time, each after the previous one's ack), then wait until
        every one is answered. Raises TimeoutError after `deadline` seconds."""
        self.texts.extend(texts)
        try:
            async with asyncio.timeout(self.deadline):
                for text in texts:
                    await self._send_until_stored(text)
                    if self.gap:
                        await asyncio.sleep(self.gap)
                await self._until_answered()
            self.finished_at = time.monotonic()
        finally:
            await self._disconnect()

    async def _send_until_stored(self, text: str) -> None:
        while text not in self.ids:
            await self._ensure_connected()
            if text in self.ids:  # the history shows it was stored after all
                return
            assert self._ws is not None
            unavailable = self.unavailable  # before sending: the refusal may come at once
            try:
                await self._ws.send(json.dumps({"type": "message", "msg": text}))
            except ConnectionClosed:
                await self._disconnect()  # reconnect (and look in the history) next round
                continue
            give_up = time.monotonic() + 30
            # Wait for the ack, an error, or the socket to close.
            while text not in self.ids and self.connected and self.unavailable == unavailable:
                await self._wait_change(1.0)
                if time.monotonic() > give_up:
                    break
            if text in self.ids:
                return
            # No ack: it may still have been stored (the ack went to a socket that closed).
            await asyncio.sleep(self.retry_after)
            self.retry_after = 0.2
            if self.connected:
                await self.refresh()
            else:
                await self._ensure_connected()
            if text not in self.ids:
                self.resent += 1

    async def _until_answered(self) -> None:
        next_refresh = time.monotonic() + 5
        while not all(self.answered(self.ids[t]) or t in self.vanished for t in self.texts):
            await self._ensure_connected()
            await self._wait_change(1.0)
            if time.monotonic() > next_refresh:  # belt and braces: the history has every reply
                next_refresh = time.monotonic() + 5
                stored = await self.refresh()
                # An acknowledged message the store no longer has (a Redis crash lost it) will
                # never be answered: the ledger counts it as lost.
                self.vanished |= {t for t in self.texts if self.ids[t] not in stored}

    async def final_history(self) -> list[dict[str, Any]]:
        session = await self._http("GET", "/refresh_token", token=self.token)
        messages: list[dict[str, Any]] = session["messages"]
        return messages
