"""A set of real server and worker processes that a fault test can kill and restart.

Waiting for a child to be ready runs in a thread, so the test's event loop (the model server,
the chat users) keeps going meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from core.config import Settings
from tests.support.chat_client import ChatUser
from tests.support.ledger import FaultRun, tally
from tests.support.processes import ServerChild, WorkerChild, settings_env


def fault_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The child processes' environment for a fault run: `settings`, quick model retries, and
    no per-address rate limits (every simulated user comes from 127.0.0.1; the per-session
    limits stay)."""
    return settings_env(
        settings,
        MODEL_MAX_RETRIES="2",
        RATE_LIMIT_ADDRESS_MESSAGES="0",
        RATE_LIMIT_TOKEN_REQUESTS="0",
        RATE_LIMIT_REFRESH_REQUESTS="0",
        **extra,
    )


class Cluster:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.servers: list[ServerChild] = []
        self.workers: list[WorkerChild] = []
        self.retired: list[ServerChild | WorkerChild] = []
        self._count = 0

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{kind}{self._count}"

    async def add_server(self, port: int = 0) -> ServerChild:
        server = ServerChild(self._name("server"), self.env, self.log_dir, port)
        self.servers.append(server)
        await asyncio.to_thread(server.wait_ready)
        return server

    async def add_worker(self, *, wait: bool = True) -> WorkerChild:
        worker = WorkerChild(self._name("worker"), self.env, self.log_dir)
        self.workers.append(worker)
        if wait:
            await asyncio.to_thread(worker.wait_ready)
        return worker

    def kill(self, child: ServerChild | WorkerChild) -> None:
        """SIGKILL: no cleanup, no hand-back."""
        child.kill()
        self._retire(child)

    async def terminate(self, child: ServerChild | WorkerChild) -> int:
        """SIGTERM, and wait for the exit: the graceful stop."""
        code = await asyncio.to_thread(child.stop)
        self._retire(child)
        return code

    def _retire(self, child: ServerChild | WorkerChild) -> None:
        if isinstance(child, ServerChild):
            self.servers.remove(child)
        else:
            self.workers.remove(child)
        self.retired.append(child)

    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def stop(self) -> None:
        for child in [*self.servers, *self.workers, *self.retired]:
            child.stop()
        self.servers.clear()
        self.workers.clear()

    def logs(self) -> str:
        children = [*self.servers, *self.workers, *self.retired]
        return "\n".join(f"--- {c.name}\n{c.log()[-3000:]}" for c in children)


def users(
    count: int, cluster: Cluster, *, gap: float = 0.0, deadline: float = 120.0
) -> list[ChatUser]:
    """`count` users, spread over the cluster's servers (each prefers its own home server)."""
    made = []
    for n in range(count):

        def servers(n: int = n) -> list[str]:
            urls = cluster.urls()
            return urls[n % len(urls) :] + urls[: n % len(urls)] if urls else []

        made.append(ChatUser(f"user{n}", servers, gap=gap, deadline=deadline))
    return made


def texts(n: int, count: int) -> list[str]:
    return [f"session {n} message {m}" for m in range(count)]


async def drive(
    fault: str,
    people: Sequence[ChatUser],
    messages: int,
    *,
    during: Callable[[asyncio.Event], Coroutine[Any, Any, None]] | None = None,
    notes: str = "",
    text_for: Any = texts,
    expected: Any = None,
    record: bool = True,
) -> FaultRun:
    """Start every user, run them all with `during` (the fault injector) alongside, and tally
    the final histories. `during` gets an event that is set once every user is done. `record`
    False: no row in the fault table (a run that reports in another table)."""
    started = time.monotonic()
    await asyncio.gather(*(user.start() for user in people))
    loads = [asyncio.create_task(u.run(text_for(n, messages))) for n, u in enumerate(people)]
    done = asyncio.Event()
    injector = asyncio.create_task(during(done)) if during is not None else None
    try:
        await asyncio.gather(*loads)
        done.set()
        if injector is not None:
            await injector
    finally:
        for task in [*loads, *([injector] if injector else [])]:
            task.cancel()
        await asyncio.gather(*loads, *([injector] if injector else []), return_exceptions=True)
    seconds = time.monotonic() - started
    histories = [await user.final_history() for user in people]
    kwargs: dict[str, Any] = {"notes": notes, "record": record}
    if expected is not None:
        kwargs["expected"] = expected
    return tally(fault, people, histories, seconds, **kwargs)
