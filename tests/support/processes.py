"""Server and worker as real child processes (`python -m server`, `python -m worker`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

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


class Child:
    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} never logged {text!r}:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl+C: SIGINT, then wait for the process to exit by itself."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class ServerChild(Child):
    def __init__(self, name: str, env: dict[str, str], log_dir: Path, port: int = 0) -> None:
        self.port = port or free_port()
        super().__init__(name, "server", {**env, "SERVER_PORT": str(self.port)}, log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()}")


class WorkerChild(Child):
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name, "worker", env, log_dir)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for_log("ready:", timeout)
