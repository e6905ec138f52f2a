"""What Redis itself counts of the commands it ran (INFO), and which ones it ran (MONITOR),
for tests that bound them. All of them include the commands that scripts call."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis


async def command_calls(redis: Redis, command: str) -> int:
    """How many times Redis has run `command` (lower case, e.g. "evalsha")."""
    stats: Any = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def redis_commands(redis: Redis) -> int:
    """How many commands Redis has run, all of them."""
    stats: Any = await redis.info("stats")
    return int(stats["total_commands_processed"])


@contextlib.asynccontextmanager
async def monitored(redis: Redis) -> AsyncIterator[list[str]]:
    """The commands Redis runs while the block runs, scripts' own calls included (MONITOR
    shows them), each as its text (`JSON.GET key $.path`): for tests that say which
    commands a step may use. Filled when the block ends."""
    seen: list[str] = []
    marker = f"monitored-{uuid.uuid4()}"
    async with redis.monitor() as monitor:
        yield seen
        await redis.echo(marker)
        async for entry in monitor.listen():
            if marker in entry["command"]:
                break
            seen.append(entry["command"])
