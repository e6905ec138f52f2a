"""The worker process: reads the request stream with a consumer group and answers messages.

Loops, all on one event loop:
- read: XREADGROUP new entries while there is room, each handled by its own task;
- reclaim: XAUTOCLAIM entries left pending by a dead worker for longer than the lease;
- heartbeat: renew this worker's session leases and reset the idle time of the entries it
  holds, so a slow generation is not mistaken for a dead worker;
- control: stop requests from the servers, over Pub/Sub.

An entry is acknowledged only after its reply is stored. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from core.config import Settings
from core.keys import Keys
from core.models import is_uuid4, short
from core.redis import create_redis, ensure_group, load_script
from core.store import SessionStore
from worker.backends import ModelBackend, create_backend
from worker.leases import LeaseManager
from worker.responder import LeaseLost, Responder

logger = logging.getLogger(__name__)

# How many entries a worker holds per generation slot (the rest wait for a session lease).
ENTRIES_PER_SLOT = 4


class WorkerFailed(RuntimeError):
    """One of the worker's loops failed; the worker stopped (after handing back its work)."""


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    def __init__(self, settings: Settings, backend: ModelBackend | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.consumer = consumer_name()
        self._backend = backend
        self._redis: Redis | None = None
        self._leases: LeaseManager | None = None
        self._responder: Responder | None = None
        self._announce: AsyncScript | None = None
        self._entries: dict[str, asyncio.Task[None]] = {}
        # Sized in run(), once the backend says how many generations it can run at once.
        self._slots = asyncio.Semaphore(1)
        self._max_entries = ENTRIES_PER_SLOT
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        lease = settings.worker_lease_seconds
        self._lease_ms = int(lease * 1000)
        self._heartbeat_every = lease / 3
        self._reclaim_every = lease / 2
        self.handled = 0

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            logger.info("worker %s stopping", self.consumer)
            self._stopping.set()

    # --- Lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `request_stop()`; then finish or hand back what is held, and close."""
        backend = self._backend or create_backend(self.settings)
        redis = self._redis = create_redis(self.settings)
        try:
            await backend.start()
            await ensure_group(redis, self.keys)
            store = SessionStore(redis, self.settings)
            self._announce = redis.register_script(
                load_script("lib_clock.lua", "announce_worker.lua")
            )
            self._leases = LeaseManager(
                redis, self.keys, self.consumer, self.settings.worker_lease_seconds
            )
            self._responder = Responder(store, backend, self.settings)
            slots = min(self.settings.worker_concurrency, backend.max_concurrency or 1 << 30)
            self._slots = asyncio.Semaphore(slots)
            self._max_entries = slots * ENTRIES_PER_SLOT
            logger.info(
                "worker %s ready: backend=%s, %d generation slot(s)",
                self.consumer,
                self.settings.model_backend,
                slots,
            )
            # Taking new work stops at request_stop(); renewing leases and hearing stop
            # requests go on until the messages in progress are finished or handed back.
            intake = [
                asyncio.create_task(self._forever(self._read_once, 0, self._stopping), name="read"),
                asyncio.create_task(
                    self._forever(self._reclaim_once, self._reclaim_every, self._stopping),
                    name="reclaim",
                ),
            ]
            upkeep = [
                asyncio.create_task(
                    self._forever(self._heartbeat_once, self._heartbeat_every, self._drained),
                    name="heartbeat",
                ),
                asyncio.create_task(self._control_loop(), name="control"),
            ]
            crashed = await self._until_stopped_or_crashed(intake + upkeep)
            await _cancel(intake)
            with contextlib.suppress(RedisError, OSError):
                await redis.zrem(self.keys.workers_alive, self.consumer)
            await self._drain()
            self._drained.set()
            await _cancel(upkeep)
            with contextlib.suppress(RedisError, OSError):  # in case a heartbeat raced the first
                await redis.zrem(self.keys.workers_alive, self.consumer)
            await self._leave_group()
            if crashed is not None:
                raise WorkerFailed("a worker loop failed; see the log above") from crashed
        finally:
            await backend.aclose()
            await redis.aclose()
            logger.info("worker %s stopped after %d messages", self.consumer, self.handled)

    async def _until_stopped_or_crashed(
        self, loops: list[asyncio.Task[None]]
    ) -> BaseException | None:
        """Wait for request_stop(); a loop that ends before that has failed, and stops the
        worker too (a worker that no longer reads or renews its leases must not linger)."""
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({stopping, *loops}, return_when=asyncio.FIRST_COMPLETED)
        await _cancel([stopping])
        for loop in loops:
            if loop.done() and not loop.cancelled() and loop.exception() is not None:
                logger.error("%s loop failed", loop.get_name(), exc_info=loop.exception())
                self.request_stop()
                return loop.exception()
        return None

    async def _drain(self) -> None:
        """Let held entries finish within the grace period, then hand the rest back."""
        held = set(self._entries.values())
        if held:
            logger.info("waiting for %d message(s) in progress", len(held))
            await asyncio.wait(held, timeout=self.settings.worker_shutdown_grace_seconds)
        unfinished = dict(self._entries)
        await _cancel(list(unfinished.values()))
        if unfinished and self._redis is not None:
            # Mark them long idle so the next XAUTOCLAIM by any worker takes them at once.
            with contextlib.suppress(RedisError, OSError):
                await self._redis.xclaim(
                    self.keys.requests,
                    self.keys.group,
                    self.consumer,
                    min_idle_time=0,
                    message_ids=list(unfinished),
                    idle=self._lease_ms * 10,
                    justid=True,
                )
            logger.info("handed back %d message(s) to the other workers", len(unfinished))

    async def _leave_group(self) -> None:
        """Remove this consumer from the group if it holds nothing (keeps XINFO tidy)."""
        assert self._redis is not None
        with contextlib.suppress(RedisError, OSError):
            pending = await self._redis.xpending_range(
                self.keys.requests,
                self.keys.group,
                min="-",
                max="+",
                count=1,
                consumername=self.consumer,
            )
            if not pending:
                await self._redis.xgroup_delconsumer(
                    self.keys.requests, self.keys.group, self.consumer
                )

    async def _forever(
        self, step: Callable[[], Awaitable[None]], every: float, until: asyncio.Event
    ) -> None:
        """Run `step` every `every` seconds until `until` is set; Redis outages are logged and
        retried with backoff."""
        failures = 0
        while not until.is_set():
            try:
                await step()
                failures = 0
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                logger.warning("consumer group missing (Redis lost its data?); recreating it")
                assert self._redis is not None
                await ensure_group(self._redis, self.keys)
            except (RedisError, OSError) as exc:
                failures += 1
                delay = min(0.1 * 2**failures, 5.0)
                logger.warning(
                    "%s: Redis unavailable (%s); retrying in %.1fs", step.__name__, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            if every:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), timeout=every)

    # --- Loops -----------------------------------------------------------------------------

    async def _read_once(self) -> None:
        assert self._redis is not None
        room = self._max_entries - len(self._entries)
        if room <= 0:
            self._room.clear()
            await self._room.wait()
            return
        batches: Any = await self._redis.xreadgroup(
            self.keys.group,
            self.consumer,
            {self.keys.requests: ">"},
            count=room,
            block=self.settings.worker_block_ms,
        )
        for _stream, entries in batches or ():
            for entry_id, fields in entries:
                self._dispatch(entry_id, fields)

    async def _reclaim_once(self) -> None:
        assert self._redis is not None
        start = "0-0"
        while (room := self._max_entries - len(self._entries)) > 0:
            reply: Any = await self._redis.xautoclaim(
                self.keys.requests,
                self.keys.group,
                self.consumer,
                min_idle_time=self._lease_ms,
                start_id=start,
                count=room,
            )
            start, claimed = reply[0], reply[1]
            for entry_id, fields in claimed:
                deliveries = await self._deliveries(entry_id)
                logger.info(
                    "reclaimed %s from a worker that stopped answering (delivery %d)",
                    entry_id,
                    deliveries,
                )
                self._dispatch(entry_id, fields)
            if start == "0-0":
                break
        await self._forget_dead_consumers()

    async def _deliveries(self, entry_id: str) -> int:
        assert self._redis is not None
        pending: Any = await self._redis.xpending_range(
            self.keys.requests, self.keys.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 0

    async def _forget_dead_consumers(self) -> None:
        """Drop consumers that hold nothing and have not been seen for a long time (workers
        that were killed), so the group's consumer list does not grow forever."""
        assert self._redis is not None
        silent_for = self._lease_ms * 10
        consumers: Any = await self._redis.xinfo_consumers(self.keys.requests, self.keys.group)
        for consumer in consumers:
            name = consumer["name"]
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] > silent_for:
                await self._redis.xgroup_delconsumer(self.keys.requests, self.keys.group, name)
                logger.info("removed consumer %s, silent for %d s", name, consumer["idle"] // 1000)

    async def _heartbeat_once(self) -> None:
        assert self._redis is not None and self._leases is not None
        await self._leases.renew_all()
        if not self._stopping.is_set():
            await self._announce_alive()
        if self._entries:
            await self._redis.xclaim(
                self.keys.requests,
                self.keys.group,
                self.consumer,
                min_idle_time=0,
                message_ids=list(self._entries),
                justid=True,
            )

    async def _announce_alive(self) -> None:
        """Liveness for the servers (their `queued` notice): this worker's heartbeat time, on
        Redis's clock, in the live-workers set; members silent for ten leases (killed workers)
        are dropped."""
        assert self._announce is not None
        await self._announce(
            keys=[self.keys.workers_alive], args=[self.consumer, 10 * self._lease_ms]
        )

    async def _control_loop(self) -> None:
        assert self._redis is not None and self._responder is not None
        while not self._drained.is_set():
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.control)
                    # Checked each second: redis-py's get_message can swallow a cancellation.
                    while not self._drained.is_set():
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None:
                            self._on_control(message["data"])
            except (RedisError, OSError) as exc:
                logger.warning("control channel lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)

    def _on_control(self, data: str) -> None:
        assert self._responder is not None
        try:
            command = json.loads(data)
        except ValueError:
            logger.warning("ignoring malformed control message")
            return
        if command.get("type") == "stop" and isinstance(command.get("token"), str):
            self._responder.request_stop(command["token"])

    # --- Entries ---------------------------------------------------------------------------

    def _dispatch(self, entry_id: str, fields: dict[str, str] | None) -> None:
        if entry_id in self._entries:
            return
        task = asyncio.create_task(self._handle(entry_id, fields or {}), name=f"entry-{entry_id}")
        self._entries[entry_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._entries.pop(entry_id, None)
            self._room.set()

        task.add_done_callback(done)

    async def _handle(self, entry_id: str, fields: dict[str, str]) -> None:
        assert self._redis is not None and self._leases is not None and self._responder is not None
        token, message_id = fields.get("token", ""), fields.get("id", "")
        if not (is_uuid4(token) and is_uuid4(message_id)):
            logger.error("dropping malformed stream entry %s: %r", entry_id, fields)
            await self._redis.xack(self.keys.requests, self.keys.group, entry_id)
            return
        try:
            lease = await self._leases.acquire(token)
            try:
                async with self._slots:
                    await self._responder.answer_through(token, message_id, lease)
            except BaseException:
                await self._leases.release(lease)
                raise
            # Released, then acknowledged: one round trip.
            await self._leases.release(lease, ack=(self.keys.requests, self.keys.group, entry_id))
            self.handled += 1
        except LeaseLost:
            logger.warning(
                "session %s was taken over; leaving %s to its new worker", short(token), entry_id
            )
        except (RedisError, OSError) as exc:
            logger.warning("entry %s left pending for a retry: %s", entry_id, exc)
        except Exception:
            # Left pending: reclaimed after a lease and tried again.
            logger.exception("entry %s failed; left pending for a retry", entry_id)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
