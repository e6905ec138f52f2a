"""The data on the wire and in Redis: sessions, messages and socket events.

`docs/protocol.md` describes these shapes for clients; this module is their single definition.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


def is_uuid4(value: str) -> bool:
    """True for a canonical UUID4 string, the only form tokens and message ids take."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return parsed.version == 4 and str(parsed) == value


MAX_TITLE_CHARS = 200
AUTO_TITLE_CHARS = 80


def title_from_message(text: str) -> str:
    """The title a conversation takes from its first message: the first non-blank line, cut
    to AUTO_TITLE_CHARS characters (with an ellipsis when cut)."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), text.strip())
    return line if len(line) <= AUTO_TITLE_CHARS else line[: AUTO_TITLE_CHARS - 1] + "…"


def short(token: str) -> str:
    """A token as it may appear in logs: never in full."""
    return f"{token[:8]}…"


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_ERROR = "model_error"
    TIMEOUT = "timeout"
    SESSION_EXPIRED = "session_expired"
    SERVICE_UNAVAILABLE = "service_unavailable"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    # The session has MAX_UNANSWERED_MESSAGES waiting for a reply already; nothing was stored.
    BACKLOG_FULL = "backlog_full"


class NoticeCode(StrEnum):
    QUEUED = "queued"


class Source(StrEnum):
    HUMAN = "human"
    BOT = "bot"


class ReplyError(BaseModel):
    code: ErrorCode
    detail: str


def _now() -> datetime:
    # Looked up at each call, so a test can skew this process's clock by patching `utcnow`.
    return utcnow()


class Message(BaseModel):
    """One message in a session document. A human message's timestamp is Redis's time
    (add_human_message.lua stamps it), so it compares with stop times whatever the servers'
    clocks say."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(default_factory=new_id)
    source: Source
    msg: str
    timestamp: datetime = Field(default_factory=_now)
    reply_to: str | None = None
    # A bot reply cut short by a stop request keeps its partial text and says so.
    stopped: bool | None = None
    # A reply that failed is stored too, so every message gets exactly one answer in history.
    error: ReplyError | None = None
    # A bot reply: prompt plus completion tokens (the backend's count when it reports one).
    tokens_used: int | None = None

    @property
    def is_human(self) -> bool:
        return self.source is Source.HUMAN


class Session(BaseModel):
    """A chat session: the RedisJSON document behind a token. A session is also a
    conversation (API v1): its id is the token. `title` and `user_id` are left out of a
    tutorial session's JSON until they are set (answers drop None fields)."""

    token: str
    name: str
    session_start: datetime
    messages: list[Message] = Field(default_factory=list)
    # Set from the first message unless the user set one (PATCH, `/title`).
    title: str | None = None
    # The account that owns the conversation; None for an anonymous one (the token is its key).
    user_id: str | None = None


class User(BaseModel):
    """An account (API v1). Its API key is shown once, at registration, and stored only as a
    SHA-256 hash (core/accounts.py)."""

    user_id: str
    name: str
    created: datetime


class ConversationSummary(BaseModel):
    """One row of `GET /v1/conversations`."""

    conversation_id: str
    title: str | None = None
    created: datetime
    updated: datetime
    message_count: int


# --- API v1 bodies and answers (docs/protocol.md "API v1") -----------------------------------

# What the OpenAPI schema says of a name or title, so that a client generated from it sends
# what the server accepts: blanks around it are trimmed; what is left is 1 to `max_chars`
# characters with no control characters (C0, DEL, C1) and no U+FFFD, and at least one visible
# character (JSON Schema `pattern`, ECMA-262; the lookahead finds the visible one). Only the
# schema holds it: the server checks the same rules itself (`name_problem`) and answers 400
# with the reason, where a pydantic constraint would answer 422. (Invisible format characters
# outside the BMP are not in `_INVISIBLE`: a name made only of those passes the pattern and is
# refused by the server.)
_CONTROLS = r"\x00-\x1f\x7f-\x9f\ufffd"
# What str.strip() trims (str.isspace), spelled out: ECMA's and Python's `\s` differ from it.
_BLANK = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_INVISIBLE = (
    _BLANK + r"\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
)


def line_schema(max_chars: int) -> dict[str, JsonValue]:
    blanks = f"[{_BLANK}]*"
    visible = f"(?=[^{_CONTROLS}]*[^{_CONTROLS}{_INVISIBLE}])"
    return {"pattern": f"^{blanks}{visible}[^{_CONTROLS}]{{1,{max_chars}}}{blanks}$"}


class ErrorBody(BaseModel):
    """An HTTP error's body: `{"detail": "<why>"}` (FastAPI's form)."""

    detail: str


class FieldProblem(BaseModel):
    loc: str = Field(description="the field refused")
    msg: str = Field(description="why")


class FieldErrorBody(BaseModel):
    """A 400 for one field, the form `POST /token` answers for its name."""

    detail: FieldProblem


class UserCreate(BaseModel):
    """`POST /v1/users`."""

    name: str = Field(
        description="trimmed; the rules of `POST /token`'s name", json_schema_extra=line_schema(100)
    )


class NewUser(User):
    """An account just made: the only answer that ever holds its API key."""

    api_key: str


class ConversationCreate(BaseModel):
    """`POST /v1/conversations`: both optional (the name defaults to the account's)."""

    name: str | None = Field(default=None, json_schema_extra=line_schema(100))
    title: str | None = Field(default=None, json_schema_extra=line_schema(MAX_TITLE_CHARS))


class TitleChange(BaseModel):
    """`PATCH /v1/conversations/{id}`."""

    title: str = Field(
        description="trimmed, 1 to 200 characters, no control characters",
        json_schema_extra=line_schema(MAX_TITLE_CHARS),
    )


class ConversationPage(BaseModel):
    conversations: list[ConversationSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


class UserPage(BaseModel):
    users: list[User]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


class ServiceStats(BaseModel):
    """`GET /v1/admin/stats` (how each number is read: server/api/routes/admin.py)."""

    sessions: int = Field(description="session documents, as of the last complete count")
    sessions_exact: bool = Field(
        description="false while the first count of a large keyspace is under way: then "
        "`sessions` is a lower bound"
    )
    sockets_open: int = Field(description="open sockets over every server (live leases)")
    workers_alive: int = Field(description="workers with a heartbeat within the lease")
    messages_waiting: int = Field(description="queued and not yet taken by a worker")
    messages_pending: int = Field(description="taken by a worker and not yet answered")
    oldest_waiting_seconds: float | None = Field(
        description="age of the oldest message not yet taken by a worker; null: none waits"
    )


# --- Server -> client events -----------------------------------------------------------------


class AckEvent(BaseModel):
    type: Literal["ack"] = "ack"
    id: str
    msg: str
    timestamp: datetime
    # Echoed from a `{"type": "message", "client_id": ...}` command, so a client can match the
    # ack to the message it sent.
    client_id: str | None = None


# `dump_event(AckEvent(...))` starts with this, as `type` and `id` are its first fields: the
# server's outbox spots acks among thousands of frames without parsing JSON.
ACK_PREFIX = '{"type":"ack","id":"'


def ack_message_id(frame: str) -> str | None:
    """The message id an ack frame (as `dump_event` writes it) acknowledges; None for any other
    frame."""
    if not frame.startswith(ACK_PREFIX):
        return None
    return frame[len(ACK_PREFIX) : len(ACK_PREFIX) + 36]


class DeltaEvent(BaseModel):
    """A piece of a reply being generated. Its wire type is "token" (the protocol's word for a
    piece of model output); in the code "token" is the session credential."""

    type: Literal["token"] = "token"
    id: str
    reply_to: str
    delta: str


class MessageEvent(BaseModel):
    type: Literal["message"] = "message"
    id: str
    reply_to: str
    source: Literal["bot"] = "bot"
    msg: str
    timestamp: datetime
    stopped: bool | None = None
    tokens_used: int | None = None


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    reply_to: str | None = None
    code: ErrorCode
    detail: str
    # `rate_limited` only: whole seconds (>= 1) to wait before sending again.
    retry_after: int | None = None
    # The `client_id` of the message command this error refuses, when it had one.
    client_id: str | None = None


class NoticeEvent(BaseModel):
    """Information about a message, not an answer (clients ignore codes they do not know)."""

    type: Literal["notice"] = "notice"
    code: NoticeCode
    reply_to: str
    detail: str


class HistoryEvent(BaseModel):
    """Sent first on a socket opened with `?history=1`: the session document as it was."""

    type: Literal["history"] = "history"
    session: Session


class ConversationChange(StrEnum):
    TITLE = "title"
    RESET = "reset"
    DELETED = "deleted"


class ConversationEvent(BaseModel):
    """A change to the conversation itself (from the API or a slash command), sent to every
    socket of the session; `deleted` is followed by a close with 1008."""

    type: Literal["conversation"] = "conversation"
    change: ConversationChange
    title: str | None = None


class CommandEvent(BaseModel):
    """The answer to a slash command (`/help`, `/reset`, `/stop`, `/title`), to the socket
    that sent it only. Never stored as a chat message."""

    type: Literal["command"] = "command"
    command: str
    detail: str
    title: str | None = None


Event = (
    AckEvent
    | DeltaEvent
    | MessageEvent
    | ErrorEvent
    | NoticeEvent
    | HistoryEvent
    | ConversationEvent
    | CommandEvent
)


def dump_event(event: Event) -> str:
    return event.model_dump_json(exclude_none=True)


def reply_event(reply: Message) -> MessageEvent | ErrorEvent:
    """The event announcing a stored bot reply (or the error stored in its place)."""
    assert reply.reply_to is not None
    if reply.error is not None:
        return ErrorEvent(reply_to=reply.reply_to, code=reply.error.code, detail=reply.error.detail)
    return MessageEvent(
        id=reply.id,
        reply_to=reply.reply_to,
        msg=reply.msg,
        timestamp=reply.timestamp,
        stopped=reply.stopped,
        tokens_used=reply.tokens_used,
    )
