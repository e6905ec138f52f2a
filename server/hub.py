"""Fan-out of session events from Redis Pub/Sub to the sockets of this server process.

One Pub/Sub connection per process (per Redis node on a cluster), however many sockets: a
sharded channel per session (in the session's slot, core/keys.py) is subscribed while at least
one socket of that session is open here. Workers publish to the channel and
every server holding a socket of the session receives the event; nobody consumes or deletes
it, so several servers never take events from one another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.exceptions import RedisError

from core.keys import Keys
from core.models import ConversationChange, ConversationEvent, ack_message_id, dump_event
from core.redis import AnyRedis
from core.subscriber import ShardedSubscriber

logger = logging.getLogger(__name__)

RESYNC_CODE = 1012  # "service restart": reconnect, and reload the history first
DELETED_CODE = 1008  # policy violation: the conversation is gone, do not reconnect to it
DELETED_REASON = "Conversation deleted"
# The event change_conversation.lua publishes when a conversation is deleted, exactly.
DELETED_FRAME = dump_event(ConversationEvent(change=ConversationChange.DELETED))


class OutboxOverflow(Exception):
    """The socket did not keep up with its events."""


@dataclass(frozen=True, slots=True)
class CloseSocket:
    """Queued after the last frame: the sender closes the socket once it has sent the rest."""

    code: int
    reason: str


class Outbox:
    """The outgoing frames of one socket: events from Redis and the server's own replies.

    Bounded in bytes, not frames: what one slow or hostile client can make the server hold is
    `max_bytes` (each frame counted as the memory its string takes, so a frame of astral
    characters counts four bytes a character). Past it the outbox drops everything, and
    `get` raises OutboxOverflow so the sender closes the socket (the client resyncs).

    A deque and at most one waiting future: one server holds thousands of idle sockets, and
    an asyncio.Queue (three deques and an Event each) cost about 2 KiB more per socket. The
    bookkeeping for frames held until an ack (`put_after_ack`) is made on first use, so an
    idle socket does not pay for it.
    """

    __slots__ = (
        "_acked",
        "_after_ack",
        "_bytes",
        "_frames",
        "_max_bytes",
        "_waiter",
        "overflowed",
    )

    MAX_HELD = 100  # frames waiting for their ack (a lost ack must not keep them forever)

    def __init__(self, max_bytes: int) -> None:
        self._frames: collections.deque[str | CloseSocket] = collections.deque()
        self._max_bytes = max_bytes
        self._bytes = 0  # what the queued frames take
        self._waiter: asyncio.Future[None] | None = None
        self._after_ack: dict[str, str] | None = None  # message id -> frame to send after its ack
        # Ids of the latest acks sent (a frame may be put after its ack went out).
        self._acked: collections.deque[str] | None = None
        self.overflowed = False

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put(self, frame: str | CloseSocket) -> None:
        if self.overflowed:
            return
        size = sys.getsizeof(frame) if isinstance(frame, str) else 0
        if self._bytes + size > self._max_bytes:
            self.overflowed = True
            self._frames.clear()  # nobody will send them: free the memory now
            self._after_ack = None
            self._bytes = 0
        else:
            self._frames.append(frame)
            self._bytes += size
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def put_after_ack(self, message_id: str, frame: str) -> None:
        """Send `frame` right after the ack of `message_id` (which comes through Pub/Sub and
        may not have arrived yet), or now if it has passed already."""
        if self._acked is not None and message_id in self._acked:
            self.put(frame)
            return
        if self._after_ack is None:
            self._after_ack = {}
        if len(self._after_ack) >= self.MAX_HELD:
            self._after_ack.pop(next(iter(self._after_ack)))
        self._after_ack[message_id] = frame

    async def get(self) -> str | CloseSocket:
        """The next frame, in order; raises OutboxOverflow once a frame was dropped."""
        while True:
            if self.overflowed:
                raise OutboxOverflow
            if self._frames:
                frame = self._frames.popleft()
                if isinstance(frame, str):
                    self._bytes -= sys.getsizeof(frame)
                    message_id = ack_message_id(frame)
                    if message_id is not None:
                        self._note_ack(message_id)
                return frame
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _note_ack(self, message_id: str) -> None:
        if self._acked is None:
            self._acked = collections.deque(maxlen=self.MAX_HELD)
        self._acked.append(message_id)
        held = self._after_ack.pop(message_id, None) if self._after_ack else None
        if held is not None:
            self._frames.appendleft(held)  # the very next frame, right after its ack
            self._bytes += sys.getsizeof(held)


class EventHub:
    """The sockets of this process by session, fed from the sessions' sharded channels
    (core/subscriber.py: one connection per Redis node)."""

    def __init__(self, redis: AnyRedis, keys: Keys, outbox_max_bytes: int = 1024 * 1024) -> None:
        self._keys = keys
        self._outbox_max_bytes = outbox_max_bytes
        self._subscriber = ShardedSubscriber(
            redis, self._deliver, self._on_reconnect, self._on_moved
        )
        self._subscribers: dict[str, set[Outbox]] = {}
        self._subscribing: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def aclose(self) -> None:
        self._started = False
        await self._subscriber.aclose()

    @property
    def running(self) -> bool:
        """False once event fan-out stopped: sockets would get no events."""
        return self._started and self._subscriber.running

    @property
    def channels(self) -> int:
        return len(self._subscribers)

    @contextlib.asynccontextmanager
    async def subscribe(self, token: str) -> AsyncIterator[Outbox]:
        """Receive the session's events in an outbox for as long as the context is open."""
        assert self._started, "EventHub.start() was not called"
        channel = self._keys.events(token)
        outbox = Outbox(self._outbox_max_bytes)
        try:
            async with self._lock:
                members = self._subscribers.setdefault(channel, set())
                members.add(outbox)
                subscribing = self._subscribing.get(channel)
                if subscribing is None:
                    subscribing = asyncio.create_task(self._subscriber.subscribe(channel))
                    self._subscribing[channel] = subscribing
            # Events published before Redis confirms would be missed: wait for it.
            await asyncio.shield(subscribing)
            yield outbox
        finally:
            async with self._lock:
                members = self._subscribers.get(channel, set())
                members.discard(outbox)
                if not members and self._subscribers.pop(channel, None) is not None:
                    self._subscribing.pop(channel, None)
                    with contextlib.suppress(RedisError, OSError):
                        await self._subscriber.unsubscribe(channel)

    def _on_reconnect(self) -> None:
        """After a lost connection, events may have been missed: close every socket so its
        client reconnects and reloads the history, where every finished reply is."""
        logger.warning(
            "Pub/Sub reconnected; closing %d channel(s) so clients resync", self.channels
        )
        for members in self._subscribers.values():
            for outbox in members:
                outbox.put(CloseSocket(RESYNC_CODE, "Events may have been missed; reconnect"))

    def _on_moved(self, channel: str) -> None:
        """The channel's slot moved to another node (a reshard): only its sockets may have
        missed events, so only they are told to resync; the other sessions go on."""
        members = self._subscribers.get(channel, set())
        logger.warning(
            "channel's slot moved; closing its %d socket(s) so they resync", len(members)
        )
        for outbox in members:
            outbox.put(CloseSocket(RESYNC_CODE, "Events may have been missed; reconnect"))

    def _deliver(self, channel: str, message: str) -> None:
        """Put the message's events in every outbox of the channel; after a `deleted` event,
        the close (1008): the session is gone, so its sockets have nothing left to serve.

        A message holds one event, or several joined by newlines (add_reply.lua sends a
        reply's last `token` event and its `message` event in one SPUBLISH); an event is
        compact JSON, which holds no newline."""
        frames = message.split("\n")
        for outbox in tuple(self._subscribers.get(channel, ())):
            for frame in frames:
                outbox.put(frame)
                if frame == DELETED_FRAME:
                    outbox.put(CloseSocket(DELETED_CODE, DELETED_REASON))
