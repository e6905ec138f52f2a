"""Server and worker as real child processes (`python -m server`, `python -m worker`)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.support import Child
from core.config import Settings
from launcher.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a child process the same settings as `settings`."""
    env = dict(os.environ)
    for name in (
        "redis_url",
        "key_prefix",
        "model_backend",
        "openai_base_url",
        "worker_lease_seconds",
        "worker_block_ms",
        "worker_shutdown_grace_seconds",
        "model_timeout_seconds",
        "model_max_new_tokens",
        "client_dir",
    ):
        env[name.upper()] = str(getattr(settings, name))
    env["LOG_LEVEL"] = "INFO"
    env.update(extra)
    return env


class ServerChild(Child):
    def __init__(self, name: str, env: dict[str, str], log_dir: Path, port: int = 0) -> None:
        self.port = port or free_port()
        super().__init__(name, ["server"], {**env, "SERVER_PORT": str(self.port)}, log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_http(f"{self.url}/readyz", timeout)


class WorkerChild(Child):
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name, ["worker"], env, log_dir)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for_log("ready:", timeout)
