"""The hot path's Redis calls, sent together as one pipeline while others are on their way.

A worker answering 50 sessions at once, or a server taking their 50 messages, makes the same
script call for each, from 50 tasks, within microseconds. Sent one by one, each costs a pooled
connection checkout, a socket write, a wake-up for its reply and a read: redis-py spends about
90 us of CPU per EVALSHA that way, against about 25 us each when 50 go in one pipeline (one
connection, one write, one read; measured on the 2-core bench machine). Redis, too, reads and
answers them in one go. This is what ioredis and Lettuce call auto-pipelining.

A call made while nothing is on its way goes at once, alone, from its caller's task: no
latency is added to a lone call. A call made while one (or a pipeline) is on its way waits
for it and then goes with every other call made meanwhile, as one non-transactional
pipeline; the busier the process, the bigger the pipelines. For the callers nothing else
changes:
- each gets its own reply, or its own error (a script error is that call's only);
- a lost connection fails (after the client's retries) every call of that pipeline, as it
  would each of them sent alone;
- a call cancelled while it waits is not sent; one cancelled on its way is sent, as a
  command already written would be;
- calls Redis refuses with NOSCRIPT (it lost its scripts: a restart, a failover) go again
  together once each script is loaded, once.

On a Redis Cluster every call goes alone: the cluster client splits a pipeline by node and
retries it by its own rules (MOVED, ASK), which the callers' guarantees were not built on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from core.redis import AnyRedis

Arg = str | int | float | bytes


class _Call:
    """One call: a script (with its keys and args) or a plain command; once it waits to go
    with others, also the future its caller waits on."""

    __slots__ = ("args", "future", "keys", "script")

    future: asyncio.Future[Any]  # set in AutoPipeline._run, for a call that waits

    def __init__(
        self, script: AsyncScript | None, args: tuple[Arg, ...], keys: tuple[Arg, ...] = ()
    ) -> None:
        self.script, self.args, self.keys = script, args, keys

    async def alone(self, redis: AnyRedis) -> Any:
        if self.script is not None:
            keys: list[Any] = list(self.keys)
            return await self.script(keys=keys, args=list(self.args), client=redis)
        return await redis.execute_command(*self.args)

    def queue_on(self, pipe: Any) -> None:
        if self.script is not None:
            pipe.evalsha(self.script.sha, len(self.keys), *self.keys, *self.args)
        else:
            pipe.execute_command(*self.args)

    def settle(self, reply: Any) -> None:
        if self.future.done():  # its caller was cancelled meanwhile
            return
        if isinstance(reply, Exception):
            self.future.set_exception(reply)
        else:
            self.future.set_result(reply)


class AutoPipeline:
    def __init__(self, redis: AnyRedis) -> None:
        self._redis = redis
        self._enabled = isinstance(redis, Redis)
        # Calls made while others are on their way, sent as one pipeline when those are back.
        self._queued: list[_Call] = []
        self._busy = False  # a call or a pipeline is on its way
        self._flushing: set[asyncio.Task[None]] = set()

    async def script(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """`script(keys=keys, args=args)`, sent with the other calls waiting to go."""
        call = _Call(script, tuple(args), tuple(keys))
        return await self._run(call)

    async def command(self, *args: Arg) -> Any:
        """`execute_command(*args)`, sent with the other calls waiting to go."""
        return await self._run(_Call(None, args))

    async def _run(self, call: _Call) -> Any:
        """With nothing on its way, the call goes at once, alone, from its caller's own task
        (no latency added); else it waits for what is on its way and then goes with every
        call made meanwhile."""
        if not self._enabled:
            return await call.alone(self._redis)
        if self._busy:
            call.future = asyncio.get_running_loop().create_future()
            self._queued.append(call)
            return await call.future
        self._busy = True
        try:
            return await call.alone(self._redis)
        finally:
            self._next()

    def _next(self) -> None:
        calls = [call for call in self._queued if not call.future.cancelled()]
        self._queued = []
        if not calls:
            self._busy = False
            return
        task = asyncio.get_running_loop().create_task(self._send(calls))
        self._flushing.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._flushing.discard(task)
        self._next()

    async def _send(self, calls: list[_Call]) -> None:
        try:
            replies = await self._execute(calls)
        except Exception as exc:  # a lost connection, after the client's retries: all fail
            replies = [exc] * len(calls)
        except BaseException:
            for call in calls:
                call.future.cancel()
            raise
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            for i, reply in zip(unknown, await self._after_loading(calls, unknown), strict=True):
                replies[i] = reply
        for call, reply in zip(calls, replies, strict=True):
            call.settle(reply)

    async def _after_loading(self, calls: list[_Call], unknown: list[int]) -> list[Any]:
        """The replies of the calls Redis refused with NOSCRIPT (it lost its scripts: a
        restart, a failover), once each of their scripts is loaded, as AsyncScript does for
        a call alone: one SCRIPT LOAD per script, not one per call, then one pipeline."""
        again = [calls[i] for i in unknown]
        try:
            for source in {call.script.script for call in again if call.script is not None}:
                await self._redis.script_load(source)
            return await self._execute(again)
        except Exception as exc:
            return [exc] * len(again)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        if len(calls) == 1:  # as without this class (alone() loads a script Redis lacks)
            return [await calls[0].alone(self._redis)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                call.queue_on(pipe)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
