"""The worker process: reads the request stream with a consumer group and answers messages.

Loops, all on one event loop:
- read: XREADGROUP new entries from every partition's request stream while there is room,
  each handled by its own task (one reader for all streams on a single Redis, one per stream
  on a cluster, where one command reads one slot);
- reclaim: XAUTOCLAIM entries left pending by a dead worker for longer than the lease;
- heartbeat: renew this worker's session leases and reset the idle time of the entries it
  holds, so a slow generation is not mistaken for a dead worker;
- control: requests from the servers to stop a reply, over sharded Pub/Sub (a channel per
  partition). No entry is taken before every control channel is subscribed, so a stop for
  the first reply is not missed.

An entry is acknowledged (and deleted) only after its reply is stored. Redis refusing commands
for a while (outage.py) is retried in every loop, never a reason to exit. See
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from core.config import Settings
from core.keys import Keys
from core.metrics import WORKER_RECLAIMS
from core.models import is_uuid4, short
from core.redis import (
    AnyRedis,
    RedisMode,
    client_for,
    ensure_group,
    load_script,
    redis_mode,
    stream_groups,
)
from core.store import LeaseBusy, SessionStore
from core.subscriber import ShardedSubscriber
from worker.backends import ModelBackend, create_backend
from worker.leases import LeaseManager, SessionLease, finish_entry
from worker.outage import REDIS_TROUBLE, Episode, is_nogroup, is_transient
from worker.responder import LeaseLost, Responder

logger = logging.getLogger(__name__)

# Read room is counted in sessions, not entries: a worker takes new entries while it holds
# fewer than SESSIONS_PER_SLOT sessions per generation slot, so a burst from one session (whose
# entries wait for each other, one at a time) does not keep other sessions' messages unread.
SESSIONS_PER_SLOT = 4
# A hard bound on the entries held per session of room, for sessions without a backlog cap
# (MAX_UNANSWERED_MESSAGES=0): a held entry costs a task and an id in each heartbeat.
ENTRIES_PER_SESSION_ROOM = 16


def generation_slots(settings: Settings, backend: ModelBackend) -> int:
    """Generations run at once: WORKER_CONCURRENCY when set, else the backend's default (a
    remote API wants hundreds in flight, a local model what it can batch), never more than the
    backend can run."""
    wanted = settings.worker_concurrency or backend.default_concurrency
    return min(wanted, backend.max_concurrency or wanted)


@dataclass(frozen=True, slots=True)
class EntryRef:
    """A request-stream entry: ids are unique in one stream only, so the stream goes along."""

    stream: str
    id: str


class WorkerFailed(RuntimeError):
    """One of the worker's loops failed; the worker stopped (after handing back its work)."""


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def redacted(fields: dict[str, str]) -> dict[str, str]:
    """A stream entry's fields as they may appear in a log: a session token (a credential)
    shortened, any other value but the message id reduced to its length."""
    shown: dict[str, str] = {}
    for name, value in list(fields.items())[:8]:
        text = str(value)
        if name == "token":
            shown[name] = short(text)
        elif name == "id" and is_uuid4(text):
            shown[name] = text
        else:
            shown[name[:32]] = f"<{len(text)} chars>"
    return shown


@dataclass(frozen=True, slots=True)
class Resources:
    """What `run()` started, for the loops to use; closed when `run()` ends."""

    redis: AnyRedis
    store: SessionStore
    leases: LeaseManager
    responder: Responder
    announce: AsyncScript


class Worker:
    def __init__(self, settings: Settings, backend: ModelBackend | None = None) -> None:
        self.settings = settings
        self.keys = Keys.from_settings(settings)
        self.consumer = consumer_name()
        self._backend = backend
        self._entries: dict[EntryRef, asyncio.Task[None]] = {}
        # Entries held per session, and the lock its entries take turns with (so they wait
        # here, not by polling the session's lease in Redis).
        self._sessions: dict[str, int] = {}
        self._turns: dict[str, asyncio.Lock] = {}
        # Sized in run(), once the backend says how many generations it can run at once.
        self._slots = asyncio.Semaphore(1)
        self._max_sessions = SESSIONS_PER_SLOT
        self._room = asyncio.Event()
        self._listening = asyncio.Event()  # every control channel subscribed
        # Set at the first heartbeat: listening, taking entries, and counted as alive.
        self.ready = asyncio.Event()
        self._shutting_down = asyncio.Event()
        self._drained = asyncio.Event()
        self._entry_outage = Episode("entries")
        lease = settings.worker_lease_seconds
        self._lease_ms = int(lease * 1000)
        self._heartbeat_every = lease / 3
        self._reclaim_every = lease / 2
        self.handled = 0

    def request_shutdown(self) -> None:
        if not self._shutting_down.is_set():
            logger.info("worker %s shutting down", self.consumer)
            self._shutting_down.set()

    # --- Lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `request_shutdown()`; then finish or hand back what is held, and close."""
        modes: list[RedisMode] = []

        async def detect() -> None:
            modes.append(await redis_mode(self.settings))

        if not await self._until_answered("connect", detect):
            return  # shut down before Redis ever answered
        backend = self._backend or create_backend(self.settings)
        redis = client_for(self.settings, modes[0])
        try:
            await backend.start()
            slots = generation_slots(self.settings, backend)
            self._slots = asyncio.Semaphore(slots)
            self._max_sessions = slots * SESSIONS_PER_SLOT
            store = SessionStore(redis, self.settings, self.keys)
            resources = Resources(
                redis=redis,
                store=store,
                leases=LeaseManager(
                    redis, self.keys, self.consumer, self.settings.worker_lease_seconds
                ),
                responder=Responder(store, backend, self.settings),
                announce=redis.register_script(load_script("lib_clock.lua", "announce_worker.lua")),
            )
            if await self._until_answered("start", lambda: ensure_group(redis, self.keys)):
                logger.info(
                    "worker %s ready: backend=%s, %d generation slot(s)",
                    self.consumer,
                    self.settings.model_backend,
                    slots,
                )
                await self._serve(resources)
        finally:
            await backend.aclose()
            await redis.aclose()
            logger.info("worker %s stopped after %d messages", self.consumer, self.handled)

    async def _until_answered(self, name: str, step: Callable[[], Awaitable[None]]) -> bool:
        """Run `step` until it succeeds (True), retrying while Redis refuses or is away, or
        until a shutdown is requested (False)."""
        outage = Episode(name)
        while not self._shutting_down.is_set():
            try:
                await step()
            except REDIS_TROUBLE as exc:
                if not is_transient(exc):
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._shutting_down.wait(), outage.failed(exc))
                continue
            outage.ended()
            return True
        return False

    async def _serve(self, r: Resources) -> None:
        # Taking new work stops at request_shutdown(); renewing leases and hearing stop
        # requests go on until the messages in progress are finished or handed back.
        until = self._shutting_down
        control = asyncio.create_task(self._control_loop(r), name="control")
        listening = asyncio.create_task(self._listening.wait())
        shutdown = asyncio.create_task(until.wait())
        await asyncio.wait({control, listening, shutdown}, return_when=asyncio.FIRST_COMPLETED)
        await _cancel([listening, shutdown])
        intake = [
            self._loop("read", self._reader(r, streams), 0, until, r)
            for streams in stream_groups(r.redis, self.keys)
        ]
        intake.append(
            self._loop("reclaim", lambda: self._reclaim_once(r), self._reclaim_every, until, r)
        )
        upkeep = [
            self._loop(
                "heartbeat", lambda: self._heartbeat_once(r), self._heartbeat_every,
                self._drained, r,
            ),
            control,
        ]  # fmt: skip
        crashed = await self._until_shutdown_or_crashed(intake + upkeep)
        await _cancel(intake)
        with contextlib.suppress(RedisError, OSError):
            await r.redis.zrem(self.keys.workers_alive, self.consumer)
        await self._drain(r)
        self._drained.set()
        await _cancel(upkeep)
        with contextlib.suppress(RedisError, OSError):  # in case a heartbeat raced the first
            await r.redis.zrem(self.keys.workers_alive, self.consumer)
        await self._leave_group(r.redis)
        if crashed is not None:
            raise WorkerFailed("a worker loop failed; see the log above") from crashed

    def _loop(
        self,
        name: str,
        step: Callable[[], Awaitable[None]],
        every: float,
        until: asyncio.Event,
        r: Resources,
    ) -> asyncio.Task[None]:
        return asyncio.create_task(self._forever(name, step, every, until, r), name=name)

    async def _until_shutdown_or_crashed(
        self, loops: list[asyncio.Task[None]]
    ) -> BaseException | None:
        """Wait for request_shutdown(); a loop that ends before that has failed, and shuts the
        worker down too (a worker that no longer reads or renews its leases must not linger)."""
        shutting_down = asyncio.create_task(self._shutting_down.wait())
        await asyncio.wait({shutting_down, *loops}, return_when=asyncio.FIRST_COMPLETED)
        await _cancel([shutting_down])
        for loop in loops:
            if loop.done() and not loop.cancelled() and loop.exception() is not None:
                logger.error("%s loop failed", loop.get_name(), exc_info=loop.exception())
                self.request_shutdown()
                return loop.exception()
        return None

    async def _drain(self, r: Resources) -> None:
        """Let held entries finish within the grace period, then hand the rest back."""
        held = set(self._entries.values())
        if held:
            logger.info("waiting for %d message(s) in progress", len(held))
            await asyncio.wait(held, timeout=self.settings.worker_shutdown_grace_seconds)
        unfinished = dict(self._entries)
        await _cancel(list(unfinished.values()))
        if unfinished:
            # Mark them long idle so the next XAUTOCLAIM by any worker takes them at once.
            with contextlib.suppress(RedisError, OSError):
                await self._touch(r.redis, list(unfinished), idle=self._lease_ms * 10)
            logger.info("handed back %d message(s) to the other workers", len(unfinished))

    async def _touch(
        self, redis: AnyRedis, entries: list[EntryRef], idle: int | None = None
    ) -> None:
        """XCLAIM the entries for this consumer again (one command per stream): their idle
        time restarts (a slow generation is not taken for a dead worker), or is set to `idle`
        (handed back: the next XAUTOCLAIM takes them at once)."""
        by_stream: dict[str, list[Any]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.id)
        for stream, ids in by_stream.items():
            await redis.xclaim(
                stream,
                self.keys.group,
                self.consumer,
                min_idle_time=0,
                message_ids=ids,
                idle=idle,
                justid=True,
            )

    async def _leave_group(self, redis: AnyRedis) -> None:
        """Remove this consumer from the group if it holds nothing (keeps XINFO tidy)."""
        with contextlib.suppress(RedisError, OSError):
            for stream in self.keys.streams:
                pending = await redis.xpending_range(
                    stream, self.keys.group, min="-", max="+", count=1, consumername=self.consumer
                )
                if not pending:
                    await redis.xgroup_delconsumer(stream, self.keys.group, self.consumer)

    async def _forever(
        self,
        name: str,
        step: Callable[[], Awaitable[None]],
        every: float,
        until: asyncio.Event,
        r: Resources,
    ) -> None:
        """Run `step` every `every` seconds until `until` is set. Redis outages and refusals
        (outage.py) are retried with backoff, one log line per episode; a missing consumer
        group is recreated; any other error ends the loop (and the worker)."""
        outage = Episode(name)
        while not until.is_set():
            try:
                await step()
            except REDIS_TROUBLE as exc:
                if not is_transient(exc):
                    raise
                if is_nogroup(exc):
                    logger.warning("consumer group missing (Redis lost its data?); recreating it")
                    with contextlib.suppress(RedisError, OSError):
                        await ensure_group(r.redis, self.keys)
                        continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), timeout=outage.failed(exc))
                continue
            outage.ended()
            if every:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), timeout=every)

    # --- Loops -----------------------------------------------------------------------------

    def _read_room(self) -> int:
        """How many entries to take: room is counted in sessions held (see SESSIONS_PER_SLOT),
        within a hard bound on the entries held."""
        sessions = self._max_sessions - len(self._sessions)
        entries = self._max_sessions * ENTRIES_PER_SESSION_ROOM - len(self._entries)
        return min(sessions, entries)

    def _reader(self, r: Resources, streams: tuple[str, ...]) -> Callable[[], Awaitable[None]]:
        return lambda: self._read_once(r, streams)

    async def _read_once(self, r: Resources, streams: tuple[str, ...]) -> None:
        """One XREADGROUP over `streams`. COUNT is per stream, so the room is shared out over
        all partitions; a read can take up to one entry per partition past the room (each
        stream gives at least one), a bound of REQUEST_PARTITIONS."""
        room = self._read_room()
        if room <= 0:
            self._room.clear()
            await self._room.wait()
            return
        batches: Any = await r.redis.xreadgroup(
            self.keys.group,
            self.consumer,
            dict.fromkeys(streams, ">"),
            count=max(1, room // self.keys.partitions),
            block=self.settings.worker_block_ms,
        )
        for stream, entries in batches or ():
            for entry_id, fields in entries:
                self._dispatch(r, EntryRef(stream, entry_id), fields)

    async def _reclaim_once(self, r: Resources) -> None:
        for stream in self.keys.streams:
            await self._reclaim_stream(r, stream)
            await self._forget_dead_consumers(r.redis, stream)

    async def _reclaim_stream(self, r: Resources, stream: str) -> None:
        start = "0-0"
        while (room := self._read_room()) > 0:
            reply: Any = await r.redis.xautoclaim(
                stream,
                self.keys.group,
                self.consumer,
                min_idle_time=self._lease_ms,
                start_id=start,
                count=room,
            )
            start, claimed = reply[0], reply[1]
            for entry_id, fields in claimed:
                WORKER_RECLAIMS.inc()
                deliveries = await self._deliveries(r.redis, stream, entry_id)
                logger.info(
                    "reclaimed %s from a worker that stopped answering (delivery %d)",
                    entry_id,
                    deliveries,
                )
                self._dispatch(r, EntryRef(stream, entry_id), fields)
            if start == "0-0":
                break

    async def _deliveries(self, redis: AnyRedis, stream: str, entry_id: str) -> int:
        pending: Any = await redis.xpending_range(
            stream, self.keys.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 0

    async def _forget_dead_consumers(self, redis: AnyRedis, stream: str) -> None:
        """Drop consumers that hold nothing and have not been seen for a long time (workers
        that were killed), so the group's consumer list does not grow forever."""
        silent_for = self._lease_ms * 10
        consumers: Any = await redis.xinfo_consumers(stream, self.keys.group)
        for consumer in consumers:
            name = consumer["name"]
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] > silent_for:
                await redis.xgroup_delconsumer(stream, self.keys.group, name)
                logger.info("removed consumer %s, silent for %d s", name, consumer["idle"] // 1000)

    async def _heartbeat_once(self, r: Resources) -> None:
        await r.leases.renew_all()
        if not self._shutting_down.is_set():
            await self._announce_alive(r)
        if self._entries:
            await self._touch(r.redis, list(self._entries))

    async def _announce_alive(self, r: Resources) -> None:
        """Liveness for the servers (their `queued` notice): this worker's heartbeat time, on
        Redis's clock, in the live-workers set; members silent for ten leases (killed workers)
        are dropped."""
        await r.announce(keys=[self.keys.workers_alive], args=[self.consumer, 10 * self._lease_ms])
        self.ready.set()

    async def _control_loop(self, r: Resources) -> None:
        """Listen on every partition's control channel (core/subscriber.py, one connection per
        Redis node) until drained; `_listening` is set once Redis has confirmed them all (the
        intake waits for it)."""
        subscriber = ShardedSubscriber(
            r.redis, lambda _channel, data: self._on_control(r, data), self._on_control_lost
        )
        outage = Episode("control")
        try:
            while not self._listening.is_set():
                try:
                    await subscriber.subscribe(*self.keys.control_channels)
                except (RedisError, OSError, TimeoutError) as exc:
                    await asyncio.sleep(max(1.0, outage.failed(exc)))
                    continue
                outage.ended()
                self._listening.set()
            await self._drained.wait()
        finally:
            await subscriber.aclose()

    def _on_control_lost(self) -> None:
        logger.warning(
            "control channel connection lost: a stop sent meanwhile does not reach a reply "
            "being generated; one not started yet still sees it (the stop time is in Redis)"
        )

    def _on_control(self, r: Resources, data: str) -> None:
        try:
            command = json.loads(data)
        except ValueError:
            logger.warning("ignoring malformed control message")
            return
        if command.get("type") == "stop" and isinstance(command.get("token"), str):
            r.responder.request_stop(command["token"])

    # --- Entries ---------------------------------------------------------------------------

    def _dispatch(self, r: Resources, entry: EntryRef, fields: dict[str, str] | None) -> None:
        if entry in self._entries:
            return
        fields = fields or {}
        token = fields.get("token", "")
        task = asyncio.create_task(self._handle(r, entry, fields), name=f"entry-{entry.id}")
        self._entries[entry] = task
        self._sessions[token] = self._sessions.get(token, 0) + 1

        def done(_: asyncio.Task[None]) -> None:
            self._entries.pop(entry, None)
            left = self._sessions.get(token, 1) - 1
            if left > 0:
                self._sessions[token] = left
            else:
                self._sessions.pop(token, None)
                self._turns.pop(token, None)
            self._room.set()

        task.add_done_callback(done)

    @contextlib.asynccontextmanager
    async def _turn(self, token: str) -> AsyncIterator[None]:
        """Entries of one session held here take turns without polling its lease in Redis."""
        lock = self._turns.setdefault(token, asyncio.Lock())
        async with lock:
            yield

    async def _handle(self, r: Resources, entry: EntryRef, fields: dict[str, str]) -> None:
        token, message_id = fields.get("token", ""), fields.get("id", "")
        entry_id = entry.id
        try:
            if not (is_uuid4(token) and is_uuid4(message_id)):
                logger.error("dropping malformed stream entry %s: %s", entry_id, redacted(fields))
                await finish_entry(r.redis, self.keys, entry.stream, entry_id)
                return
            async with self._turn(token):
                await self._answer_entry(r, entry_id, token, message_id)
            self.handled += 1
            self._entry_outage.ended()
        except LeaseLost:
            logger.warning(
                "session %s was taken over; leaving %s to its new worker", short(token), entry_id
            )
        except (RedisError, OSError) as exc:
            # Left pending: reclaimed after a lease and answered then.
            if is_transient(exc):
                self._entry_outage.failed(exc)
            else:
                logger.warning("entry %s left pending for a retry: %s", entry_id, exc)
        except Exception:
            # Left pending: reclaimed after a lease and tried again.
            logger.exception("entry %s failed; left pending for a retry", entry_id)

    async def _answer_entry(self, r: Resources, entry_id: str, token: str, message_id: str) -> None:
        lease = r.leases.claim(token)
        try:
            finished = await self._answer_holding(r, lease, message_id, entry_id)
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await r.leases.release(lease)
            raise
        if finished:  # the reply's script released the lease and finished the entry
            r.leases.forget(lease)
        else:  # released, then acknowledged and deleted: one round trip
            await r.leases.release(lease, done=entry_id)

    async def _answer_holding(
        self, r: Resources, lease: SessionLease, message_id: str, entry_id: str
    ) -> bool:
        """Answer in a slot; the first read of the session takes its lease in the same round
        trip. When another worker holds the lease, wait for it outside the slot (a slot is for
        generating, not for waiting), then answer."""
        try:
            async with self._slots:
                return await r.responder.answer_through(lease.token, message_id, lease, entry_id)
        except LeaseBusy:
            pass
        await r.leases.wait(lease)
        async with self._slots:
            return await r.responder.answer_through(lease.token, message_id, lease, entry_id)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
