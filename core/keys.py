"""Every Redis key, stream, group and channel name, in one place for server and worker.

All names start with `KEY_PREFIX` so several deployments (or test runs) can share one Redis.

The layout shards (docs/architecture.md, "Keys"): a session belongs to one of
`REQUEST_PARTITIONS` partitions, and every key and channel of the session carries its
partition's hash tag, as does the partition's request stream and control channel. On a Redis
Cluster a partition is one slot, so the scripts that store a message and queue it, or store a
reply and publish it, stay atomic there. The tags are chosen so that the partitions' slots are
evenly spaced over the 16384 slots: a cluster whose masters hold even slot ranges gets an even
share of partitions each. Keys that are not a session's (accounts, the per-address limits, the
live-workers set) carry no partition tag and are written by steps of their own.
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

if TYPE_CHECKING:
    from core.config import Settings

DEFAULT_PARTITIONS = 24


@functools.cache
def partition_tags(partitions: int) -> tuple[str, ...]:
    """Each partition's hash tag (`{p<K>.<J>}`): the first J whose slot falls in the K-th of
    `partitions` equal slot ranges, so the partitions' slots are evenly spaced."""
    tags = []
    for index in range(partitions):
        low = index * REDIS_CLUSTER_HASH_SLOTS // partitions
        high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // partitions
        attempt = 0
        while not low <= key_slot(f"p{index}.{attempt}".encode()) < high:
            attempt += 1
        tags.append(f"{{p{index}.{attempt}}}")
    return tuple(tags)


@functools.cache
def _session_key_shape(prefix: str) -> re.Pattern[str]:
    """A key of a session: `<prefix>:{p<K>.<J>}:<kind>:<token>`; group 1 is the kind."""
    return re.compile(re.escape(prefix) + r":\{p\d+\.\d+\}:([a-z-]+):")


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "chat"
    partitions: int = DEFAULT_PARTITIONS

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        return cls(settings.key_prefix, settings.request_partitions)

    # --- Partitions --------------------------------------------------------------------------

    def partition(self, token: str) -> int:
        """The session's partition: a stable hash of its token (CRC-32), never stored."""
        return zlib.crc32(token.encode()) % self.partitions

    def _of(self, token: str) -> str:
        """The start of every key of the session: prefix and the partition's hash tag."""
        return f"{self.prefix}:{partition_tags(self.partitions)[self.partition(token)]}"

    def kind_of(self, name: str) -> str | None:
        """What a key found by SCAN holds, for a key of a session (`session`, `sockets`,
        `events`, ...); None for any other key."""
        shape = _session_key_shape(self.prefix).match(name)
        return None if shape is None else shape.group(1)

    def requests(self, partition: int) -> str:
        """A partition's stream of human messages waiting for a reply: each entry is deleted
        once answered (XACK + XDEL), so it holds only work not done yet."""
        return f"{self.prefix}:{partition_tags(self.partitions)[partition]}:requests"

    def requests_for(self, token: str) -> str:
        """The request stream of the session's partition."""
        return self.requests(self.partition(token))

    @property
    def streams(self) -> tuple[str, ...]:
        """Every partition's request stream, in partition order."""
        return tuple(self.requests(partition) for partition in range(self.partitions))

    @property
    def group(self) -> str:
        """The consumer group every worker joins, on every request stream."""
        return f"{self.prefix}:workers"

    def control(self, partition: int) -> str:
        """Sharded Pub/Sub channel from servers to workers (requests to stop a reply) for the
        sessions of a partition; every worker listens on all of them."""
        return f"{self.prefix}:{partition_tags(self.partitions)[partition]}:control"

    def control_for(self, token: str) -> str:
        return self.control(self.partition(token))

    @property
    def control_channels(self) -> tuple[str, ...]:
        return tuple(self.control(partition) for partition in range(self.partitions))

    @property
    def servers(self) -> str:
        """Pub/Sub channel every server process listens on (keeps its connection open)."""
        return f"{self.prefix}:servers"

    @property
    def probe(self) -> str:
        """Scratch key used by readiness checks."""
        return f"{self.prefix}:probe"

    @property
    def probe_stream(self) -> str:
        """Scratch stream used by readiness checks (Streams work)."""
        return f"{self.prefix}:probe:stream"

    def session(self, token: str) -> str:
        """The RedisJSON document holding a session and its messages."""
        return f"{self._of(token)}:session:{token}"

    def events(self, token: str) -> str:
        """Sharded Pub/Sub channel carrying a session's events to the servers holding its
        sockets."""
        return f"{self._of(token)}:events:{token}"

    def lease(self, token: str) -> str:
        """Lease held by the worker generating for a session (per-session order). Written by
        worker/leases.py; add_reply.lua reads it as a fence. (The key text keeps its old
        word, `lock`.)"""
        return f"{self._of(token)}:lock:{token}"

    def attempts(self, token: str, message_id: str) -> str:
        """How many generations of a reply to this message (of this session) started and
        never finished: a count that only a dying worker leaves raised (the poison-message
        guard)."""
        return f"{self._of(token)}:attempts:{message_id}"

    def stop(self, token: str) -> str:
        """Time (epoch microseconds, Redis's clock) of the session's latest stop request."""
        return f"{self._of(token)}:stop:{token}"

    @property
    def workers_alive(self) -> str:
        """Sorted set of live workers: member = consumer name, score = last heartbeat (ms)."""
        return f"{self.prefix}:workers:alive"

    def sockets(self, token: str) -> str:
        """Sorted set of a session's open sockets on every server: score = lease expiry (ms)."""
        return f"{self._of(token)}:sockets:{token}"

    def rate(self, kind: str, subject: str) -> str:
        """Rate-limit state (a GCRA "theoretical arrival time", ms) for one kind and subject
        that is not a session: `msg-address`/address, `http-token`/address, ..."""
        return f"{self.prefix}:rate:{kind}:{subject}"

    def session_rate(self, token: str) -> str:
        """The session's own message rate limit (same state as `rate`), in its partition."""
        return f"{self._of(token)}:rate:msg-session:{token}"

    def chat_client(self, scope: str, client_id: str) -> str:
        """The conversation a `POST /v1/chat` with this client_id and no conversation_id
        created (core/store.py `claim_conversation`), so its retry goes there too. `scope` is
        the caller's user id (in the user's hash tag, with the user's other keys) or, for an
        anonymous caller, its client address. The client_id is hashed: any text, fixed size."""
        digest = hashlib.sha256(client_id.encode()).hexdigest()[:32]
        return f"{self.prefix}:chat-client:{{{scope}}}:{digest}"

    # --- Accounts (API v1): core/accounts.py writes these. ------------------------------------
    # A user's keys share the hash tag `{user_id}`, so on a Redis Cluster they sit in one slot
    # and an account's own steps stay atomic; the key-hash lookup cannot, and is written apart.

    def user(self, user_id: str) -> str:
        """Hash of one account: name, created (ISO-8601), key_hash."""
        return f"{self.prefix}:user:{{{user_id}}}"

    def user_conversations(self, user_id: str) -> str:
        """Sorted set of a user's conversations: member = token, score = last activity (ms)."""
        return f"{self.prefix}:conversations:{{{user_id}}}"

    def api_key(self, key_hash: str) -> str:
        """The user id an API key (by its SHA-256, hex) belongs to."""
        return f"{self.prefix}:apikey:{key_hash}"

    @property
    def users(self) -> str:
        """Sorted set of every account: member = user id, score = creation time (ms)."""
        return f"{self.prefix}:users"
