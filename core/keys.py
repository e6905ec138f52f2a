"""Every Redis key, stream, group and channel name, in one place for server and worker.

All names start with `KEY_PREFIX` so several deployments (or test runs) can share one Redis.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "chat"

    @property
    def requests(self) -> str:
        """The stream of human messages waiting for a reply: each entry is deleted once
        answered (XACK + XDEL), so it holds only work not done yet."""
        return f"{self.prefix}:requests"

    @property
    def group(self) -> str:
        """The consumer group every worker joins."""
        return f"{self.prefix}:workers"

    @property
    def control(self) -> str:
        """Pub/Sub channel from servers to workers (requests to stop a reply)."""
        return f"{self.prefix}:control"

    @property
    def servers(self) -> str:
        """Pub/Sub channel every server process listens on (keeps its connection open)."""
        return f"{self.prefix}:servers"

    @property
    def probe(self) -> str:
        """Scratch key used by readiness checks."""
        return f"{self.prefix}:probe"

    def session(self, token: str) -> str:
        """The RedisJSON document holding a session and its messages."""
        return f"{self.prefix}:session:{token}"

    def events(self, token: str) -> str:
        """Pub/Sub channel carrying a session's events to the servers holding its sockets."""
        return f"{self.prefix}:events:{token}"

    def lease(self, token: str) -> str:
        """Lease held by the worker generating for a session (per-session order). Written by
        worker/leases.py; add_reply.lua reads it as a fence. (The key text keeps its old word,
        `lock`, so a rolling upgrade sees the leases of the workers it replaces.)"""
        return f"{self.prefix}:lock:{token}"

    def attempts(self, message_id: str) -> str:
        """How many generations of a reply to this message started and never finished: a
        count that only a dying worker leaves raised (the poison-message guard)."""
        return f"{self.prefix}:attempts:{message_id}"

    def stop(self, token: str) -> str:
        """Time (epoch microseconds, Redis's clock) of the session's latest stop request."""
        return f"{self.prefix}:stop:{token}"

    @property
    def workers_alive(self) -> str:
        """Sorted set of live workers: member = consumer name, score = last heartbeat (ms)."""
        return f"{self.prefix}:workers:alive"

    def sockets(self, token: str) -> str:
        """Sorted set of a session's open sockets on every server: score = lease expiry (ms)."""
        return f"{self.prefix}:sockets:{token}"

    def rate(self, kind: str, subject: str) -> str:
        """Rate-limit state (a GCRA "theoretical arrival time", ms) for one kind and subject:
        `msg-session`/token, `msg-address`/address, `http-token`/address, ..."""
        return f"{self.prefix}:rate:{kind}:{subject}"

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
