"""Serve an ASGI app with uvicorn inside the test's event loop, on a real loopback port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

import uvicorn


class _QuietSignalsServer(uvicorn.Server):
    """uvicorn 0.54 takes over SIGINT/SIGTERM while serving; inside a test run, it must not."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class InProcessServer:
    """`async with InProcessServer(app) as served: served.url` — started, then shut down."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        config.setdefault("log_config", None)
        config.setdefault("log_level", "warning")
        config.setdefault("access_log", False)
        config.setdefault("timeout_graceful_shutdown", 5)
        # As `python -m server`: X-Forwarded-For is trusted only through FORWARDED_ALLOW_IPS.
        config.setdefault("proxy_headers", False)
        self.app = app
        self._config = uvicorn.Config(app, host=host, port=port, **config)
        self._server = _QuietSignalsServer(self._config)
        self._task: asyncio.Task[None] | None = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self._config.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self._config.host}:{self.port}"

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("already serving")
        self._task = asyncio.create_task(self._serve(), name="in-process-uvicorn")
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("uvicorn stopped during startup")
            await asyncio.sleep(0.005)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])

    async def _serve(self) -> None:
        try:
            await self._server.serve()
        except SystemExit as exc:  # uvicorn exits the process when it cannot start
            raise RuntimeError(f"uvicorn failed to start (exit code {exc.code})") from exc

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        task, self._task = self._task, None
        await task

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
