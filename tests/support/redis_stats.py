"""What Redis itself counts of the commands it ran (INFO), for tests that bound them. Both
figures include the commands that scripts call."""

from __future__ import annotations

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
