"""Hostile clients against a real server process (`python -m server`), a real worker and a
real Redis: each run abuses the socket one way while a well-behaved user chats, asserts that
the user lost nothing and the server stayed bounded, and records a row of the hostile table
(tests/support/hostile.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from core.config import Settings
from core.keys import Keys
from tests.conftest import make_settings
from tests.support.hostile import HostileRun, record
from tests.support.model_servers import ModelServer, ModelServerBehaviour
from tests.support.processes import ServerChild, WorkerChild, settings_env
from tests.support.raw_ws import RawSocket, close_codes

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


@pytest.fixture
async def model() -> AsyncIterator[ModelServer]:
    async with ModelServer(ModelServerBehaviour(token_delay=0.002)) as server:
        yield server


@pytest.fixture
def hostile_settings(redis_url: str, model: ModelServer) -> Settings:
    return make_settings(redis_url, openai_base_url=model.openai_base_url)


@contextlib.contextmanager
def service(settings: Settings, log_dir: Path, **extra: str) -> Iterator[ServerChild]:
    """One server and one worker process; every client comes from 127.0.0.1, so the
    per-address message and HTTP limits are off unless a run sets them."""
    env = settings_env(
        settings,
        RATE_LIMIT_ADDRESS_MESSAGES="0",
        RATE_LIMIT_TOKEN_REQUESTS="0",
        RATE_LIMIT_REFRESH_REQUESTS="0",
        **extra,
    )
    server, worker = ServerChild("server", env, log_dir), WorkerChild("worker", env, log_dir)
    try:
        server.wait_ready()
        worker.wait_ready()
        yield server
    finally:
        server.stop()
        worker.stop()


def rss(pid: int) -> tuple[float, float]:
    """The process's resident set size now and its peak (VmHWM), in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def new_session(server: ServerChild, name: str) -> str:
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post("/token", params={"name": name})
        response.raise_for_status()
        token: str = response.json()["token"]
        return token


async def history(server: ServerChild, token: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.get("/refresh_token", params={"token": token})
        response.raise_for_status()
        messages: list[dict[str, Any]] = response.json()["messages"]
        return messages


async def good_user(server: ServerChild, messages: int) -> int:
    """A well-behaved user chatting meanwhile: the number of its messages left unanswered."""
    token = await new_session(server, "good")
    async with websockets.connect(f"{server.ws_url}/chat?token={token}") as chat:
        for n in range(messages):
            await chat.send(f"good {n}")
            async with asyncio.timeout(60):
                while json.loads(await chat.recv())["type"] not in ("message", "error"):
                    pass
    stored = await history(server, token)
    answered = {m["reply_to"] for m in stored if m["source"] == "bot" and "error" not in m}
    return sum(1 for m in stored if m["source"] == "human" and m["id"] not in answered)


async def sockets_counted(redis: Redis, settings: Settings, tokens: list[str]) -> int:
    keys = Keys.from_settings(settings)
    return sum([int(await redis.zcard(keys.sockets(token))) for token in tokens])


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.2)


# --- Memory hog ---------------------------------------------------------------------------------


async def test_memory_hog_frames_from_50_sockets(
    hostile_settings: Settings, tmp_path: Path, redis: Redis
) -> None:
    """50 sockets that never read each send 8 frames of about 1 MB that get an error (an
    unknown `type` of 1 MB ending in an astral character), then one valid message."""
    frames, sessions = 8, 10
    hog = '{"type": "' + "a" * (1_000_000 - 20) + '\U0001f600"}'
    with service(hostile_settings, tmp_path, MAX_SOCKETS_PER_ADDRESS="200") as server:
        started = time.monotonic()
        before, _ = rss(server.pid)
        tokens = [await new_session(server, f"hog{n}") for n in range(sessions)]
        hogs = [
            await RawSocket.connect(f"{server.ws_url}/chat?token={token}")
            for token in tokens
            for _ in range(5)
        ]
        try:

            async def flood(n: int, hog_socket: RawSocket) -> None:
                for _ in range(frames):
                    await hog_socket.send_text(hog)
                await hog_socket.send_text(f"done {n}")

            floods = (flood(n, hog_socket) for n, hog_socket in enumerate(hogs))
            lost, *_ = await asyncio.gather(good_user(server, 3), *floods)

            async def all_done() -> bool:
                done = 0
                for token in tokens:
                    done += sum(m["msg"].startswith("done") for m in await history(server, token))
                return done == len(hogs)

            await wait_for(all_done, 120, "every hog's last message stored")
            during, peak = rss(server.pid)
        finally:
            for hog_socket in hogs:
                hog_socket.close()
        await wait_for(
            lambda: _zero(sockets_counted(redis, hostile_settings, tokens)), 60, "closed"
        )
        after, _ = rss(server.pid)
        alive = server.process.poll() is None
    growth = peak - before
    assert alive
    assert lost == 0
    assert growth < 400, (
        f"RSS {before:.0f} MiB, peak {peak:.0f}, with hogs {during:.0f}, after {after:.0f}"
    )
    record(
        HostileRun(
            case="memory-hog frames from 50 sockets",
            load=f"50 sockets x {frames} frames of 1 MB (unknown type + astral char), not reading",
            lost=lost,
            client_saw="error too_large for each frame; sockets stay open",
            figures={
                "rss_before": f"{before:.0f} MiB",
                "rss_peak": f"{peak:.0f} MiB",
                "rss_with_hogs": f"{during:.0f} MiB",
                "rss_after_close": f"{after:.0f} MiB",
            },
            seconds=time.monotonic() - started,
        )
    )


async def _zero(count: Any) -> bool:
    return int(await count) == 0


# --- Slow reader --------------------------------------------------------------------------------


async def test_slow_reader(
    hostile_settings: Settings, tmp_path: Path, redis: Redis, model: ModelServer
) -> None:
    """A client asks for a long reply (about 8 MB of token events) and never reads."""
    model.behaviour.reply_override = " ".join(["x" * 4000] * 2000)
    model.behaviour.token_delay = 0.0
    extra = {
        "SOCKET_SEND_TIMEOUT_SECONDS": "2",
        "MAX_REPLY_CHARS": str(10**7),
        "OUTBOX_MAX_BYTES": str(64 * MiB),  # a whole reply (up to 40 MB) must fit
    }
    with service(hostile_settings, tmp_path, **extra) as server:
        started = time.monotonic()
        token = await new_session(server, "slow")
        reader = await RawSocket.connect(f"{server.ws_url}/chat?token={token}")
        try:
            await reader.send_text("tell me everything")
            sent = time.monotonic()
            await wait_for(
                lambda: _zero(sockets_counted(redis, hostile_settings, [token])), 60, "released"
            )
            released = time.monotonic() - sent
            received = await reader.read_until_closed(timeout=30)
        finally:
            reader.close()
        # The reply is stored all the same, for the client to find after it reconnects.
        await wait_for(lambda: _replied(server, token), 120, "the long reply was stored")
        model.behaviour.reply_override = None
        lost = await good_user(server, 3)
        alive = server.process.poll() is None
    assert alive
    assert lost == 0
    record(
        HostileRun(
            case="slow reader",
            load="1 socket, an 8 MB reply streamed (2,000 token events of 4 kB), never read",
            lost=lost,
            client_saw="connection dropped by the server (close codes read: "
            f"{close_codes(received) or 'none, not even the close fit'})",
            figures={
                "released_after_send": f"{released:.1f} s",
                "client_buffered": f"{len(received) / MiB:.1f} MiB",
                "send_timeout": "2 s",
            },
            seconds=time.monotonic() - started,
        )
    )


async def _replied(server: ServerChild, token: str) -> bool:
    return any(m["source"] == "bot" for m in await history(server, token))


# --- Lone surrogates and deep nesting -----------------------------------------------------------


BAD_FRAMES = [
    '{"type":"message","msg":"\\ud800"}',
    '{"type":"message","msg":"hi","client_id":"\\udfff"}',
    '{"type": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}",
    '{"type": "message", "msg": "x", "a": ' + "[" * 3000 + "]" * 3000 + "}",
    "[" * 3000 + "]" * 3000,
    "nul \x00 inside",
]


async def test_lone_surrogates_and_deep_nesting(hostile_settings: Settings, tmp_path: Path) -> None:
    rounds = 50
    with service(hostile_settings, tmp_path) as server:
        started = time.monotonic()
        token = await new_session(server, "odd")
        codes: Counter[str] = Counter()
        async with websockets.connect(f"{server.ws_url}/chat?token={token}") as chat:
            for _ in range(rounds):
                for frame in BAD_FRAMES:
                    await chat.send(frame)
            async with asyncio.timeout(60):
                while sum(codes.values()) < rounds * len(BAD_FRAMES):
                    event = json.loads(await chat.recv())
                    codes[event.get("code", event["type"])] += 1
            await chat.send("and now a real one")
            async with asyncio.timeout(60):
                while json.loads(await chat.recv())["type"] != "message":
                    pass
        stored = await history(server, token)
        lost = await good_user(server, 2)
        log = server.log()
    assert lost == 0
    assert codes == {"bad_request": 5 * rounds, "too_large": rounds}
    assert [m["msg"] for m in stored if m["source"] == "human"] == ["and now a real one"]
    assert "Traceback" not in log
    record(
        HostileRun(
            case="lone surrogates and deep nesting",
            load=f"{rounds * len(BAD_FRAMES)} frames: surrogates in msg and client_id, JSON "
            "nested 3,000 deep, NUL",
            lost=lost,
            client_saw=", ".join(f"{code} x{n}" for code, n in sorted(codes.items()))
            + "; socket stayed open",
            figures={"tracebacks": "0", "stored": "1 (the real message)"},
            seconds=time.monotonic() - started,
        )
    )


# --- Socket flood from one address --------------------------------------------------------------


async def test_socket_flood_from_one_address(
    hostile_settings: Settings, tmp_path: Path, redis: Redis
) -> None:
    attempts, sessions = 80, 20
    with service(hostile_settings, tmp_path) as server:  # MAX_SOCKETS_PER_ADDRESS: 50
        started = time.monotonic()
        tokens = [await new_session(server, f"flood{n}") for n in range(sessions)]
        seen: Counter[str] = Counter()
        async with contextlib.AsyncExitStack() as held:
            flood = [
                await held.enter_async_context(
                    websockets.connect(f"{server.ws_url}/chat?token={tokens[n % sessions]}")
                )
                for n in range(attempts)
            ]
            for outcome in await asyncio.gather(*map(_first_words, flood)):
                seen.update(outcome)
            open_during = await sockets_counted(redis, hostile_settings, tokens)
            # A user from the same address cannot get in either while the flood holds 50 ...
        await wait_for(lambda: _zero(sockets_counted(redis, hostile_settings, tokens)), 30, "freed")
        # ... and can once the flood is gone.
        lost = await good_user(server, 2)
    assert lost == 0
    assert seen == {"open": 50, "too_many_connections": 30, "close 1008": 30}
    assert open_during == 50
    record(
        HostileRun(
            case="socket flood from one address",
            load=f"{attempts} sockets from 127.0.0.1 over {sessions} sessions, held open",
            lost=lost,
            client_saw="50 open; 30 got error too_many_connections, then close 1008",
            figures={"counted_in_redis": str(open_during), "after_close": "0"},
            seconds=time.monotonic() - started,
        )
    )


async def _first_words(ws: websockets.ClientConnection) -> list[str]:
    """What a flood socket was told within 5 s: an error code and its close, or "open"."""
    try:
        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
    except TimeoutError:
        return ["open"]
    try:
        await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed:
        return [event["code"], f"close {ws.close_code}"]
    return [event["code"], "still open"]


# --- Stop flood ---------------------------------------------------------------------------------


async def test_stop_flood(hostile_settings: Settings, tmp_path: Path, redis: Redis) -> None:
    stops = 500
    keys = Keys.from_settings(hostile_settings)
    with service(hostile_settings, tmp_path) as server:  # RATE_LIMIT_STOP_REQUESTS: 10 / 10 s
        started = time.monotonic()
        token = await new_session(server, "stopper")
        async with redis.pubsub() as control:
            await control.ssubscribe(*keys.control_channels)
            codes: Counter[str] = Counter()
            async with websockets.connect(f"{server.ws_url}/chat?token={token}") as chat:
                for _ in range(stops):
                    await chat.send('{"type": "stop"}')
                await chat.send("done stopping")
                async with asyncio.timeout(60):
                    while (event := json.loads(await chat.recv()))["type"] != "message":
                        if event["type"] == "error":
                            codes[event["code"]] += 1
            passed = 0
            while (message := await control.get_message(timeout=0.5)) is not None:
                passed += message["type"] == "smessage"
        lost = await good_user(server, 2)
    assert lost == 0
    assert passed == 10
    assert codes == {"rate_limited": stops - 10}
    record(
        HostileRun(
            case="stop flood",
            load=f"{stops} stop commands at once on one session",
            lost=lost,
            client_saw=f"rate_limited x{stops - 10} (with retry_after); its next message answered",
            figures={"stops_passed_on": str(passed)},
            seconds=time.monotonic() - started,
        )
    )
