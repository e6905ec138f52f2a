"""What the OpenAPI schema says about inputs and answers, so a client generated from it is
right: the patterns of names, tokens and message texts, and the bodies of the error answers.

The patterns describe the rules the handlers apply (`name_problem`, server/frames.py); the
handlers still apply them, with the status and text the contract gives (a 400 or 413, not
FastAPI's 422), so these are published with `json_schema_extra` rather than enforced by
FastAPI. They are Python regular expressions (what schemathesis generates from): JSON Schema's
dialect has no `\\p{...}`, so the character classes are spelt out from `unicodedata`.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, Field, TypeAdapter

from core.config import Settings
from core.models import MAX_TITLE_CHARS
from server.frames import CONTROL

UUID4_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


def _default(name: str) -> int:
    value = Settings.model_fields[name].default
    assert isinstance(value, int)
    return value


MAX_NAME_CHARS = _default("max_name_chars")
MAX_MESSAGE_CHARS = _default("max_message_chars")


@functools.cache
def _every_code_point() -> str:
    """Every code point, surrogates included, in order: the string is indexed by code point."""
    return "".join(map(chr, range(sys.maxunicode + 1)))


@functools.cache
def _category_letters() -> str:
    """Every code point's Unicode category as one letter (`_LETTERS`), indexed by code point."""
    return "".join(map(_LETTERS.__getitem__, map(unicodedata.category, _every_code_point())))


_CATEGORIES = (
    *("Cc", "Cf", "Cn", "Co", "Cs", "Ll", "Lm", "Lo", "Lt", "Lu", "Mc", "Me", "Mn", "Nd", "Nl"),
    *("No", "Pc", "Pd", "Pe", "Pf", "Pi", "Po", "Ps", "Sc", "Sk", "Sm", "So", "Zl", "Zp", "Zs"),
)
# Each of the 30 general categories as a letter of its own (none special in a regex class).
_LETTERS = dict(zip(_CATEGORIES, "abcdefghijklmnopqrstuvwxyzABCD", strict=True))


def _class(pattern: str) -> str:
    """A character-class body holding every code point that `pattern`, a regular expression
    for one character, matches. The runs are found by `re` in C over all code points at once:
    the schema is built at import, in every server process, and a Python call per code point
    took about 2 s of it. (No pattern here matches a surrogate, which no UTF-8 text holds.)"""
    return _spans(re.finditer(f"(?:{pattern})+", _every_code_point()))


def _category(*categories: str) -> str:
    """The character-class body of the code points in the Unicode `categories`."""
    letters = "".join(_LETTERS[c] for c in categories)
    return _spans(re.finditer(f"[{letters}]+", _category_letters()))


def _spans(runs: Iterable[re.Match[str]]) -> str:
    bounds = [(run.start(), run.end() - 1) for run in runs]
    return "".join(_escape(a) if a == b else f"{_escape(a)}-{_escape(b)}" for a, b in bounds)


def _escape(cp: int) -> str:
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def _trimmed(forbidden: str, invisible: str, max_chars: int) -> str:
    """A text that, once trimmed of whitespace (str.strip), holds nothing `forbidden`, at
    least one character that is neither invisible nor whitespace, and at most `max_chars`
    characters; the whitespace around it is allowed (it is trimmed)."""
    space = _class(r"\s")  # what str.isspace and str.strip take as whitespace
    visible = f"(?=[^{forbidden}]*[^{forbidden}{invisible}{space}])" if invisible else ""
    edge = f"[^{forbidden}{space}]"
    core = f"{edge}(?:[^{forbidden}]{{0,{max_chars - 2}}}{edge})?"
    return f"^[{space}]*{visible}{core}[{space}]*$"


def line_pattern(max_chars: int) -> str:
    """A name or a title (name_problem): no control characters and no U+FFFD (what bytes that
    are not UTF-8 decode to), something visible (not only spaces and format characters)."""
    return _trimmed(_category("Cc") + "\\ufffd", _category("Zs", "Zl", "Zp", "Cf"), max_chars)


NAME_PATTERN = line_pattern(MAX_NAME_CHARS)
TITLE_PATTERN = line_pattern(MAX_TITLE_CHARS)
# A chat message (server/frames.py): no control characters but tab and line ends, something
# that is not whitespace.
# (A carriage return is a line end there: stored as a newline, not refused.)
MESSAGE_PATTERN = _trimmed(_class("(?!\r)" + CONTROL.pattern), "", MAX_MESSAGE_CHARS)
# A client_id (server/frames.py): no control characters but tab and newline.
CLIENT_ID_PATTERN = "^[^" + _class(CONTROL.pattern) + "]*$"


def described(**schema: Any) -> dict[str, Any]:
    """`json_schema_extra` for a parameter or field: published, checked by the handler."""
    return schema


class Detail(BaseModel):
    """An error answer: what went wrong, in words."""

    detail: str


class NameRefusal(BaseModel):
    loc: str
    msg: str


class NameRefused(BaseModel):
    """`POST /token`'s 400: which parameter, and why (docs/protocol.md has the table)."""

    detail: NameRefusal


def answer(model: type[BaseModel], description: str, *, retry_after: bool = False) -> Any:
    """One entry of a route's `responses`, with the Retry-After header when it is sent."""
    entry: dict[str, Any] = {"model": model, "description": description}
    if retry_after:
        entry["headers"] = {
            "Retry-After": {
                "description": "whole seconds to wait before trying again (at least 1)",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return entry


# A conversation id in a path (`/v1/conversations/{conversation_id}`): any other id is a 404,
# so schemathesis must know that only UUID4s are meant.
ConversationId = Annotated[
    str,
    Path(
        description="the conversation's id (its session token): a lower-case UUID4",
        json_schema_extra=described(pattern=UUID4_PATTERN),
    ),
]

RATE_LIMITED = answer(
    Detail,
    "Too many requests from this address; Retry-After says when to try again",
    retry_after=True,
)
UNAVAILABLE = answer(Detail, "Redis is unreachable: nothing was done; try again", retry_after=True)


def inline_schema(annotation: Any) -> dict[str, Any]:
    """The JSON Schema of `annotation` with its definitions written in place: a schema that
    sits inside another document (an SSE event's `contentSchema`) cannot point at its own
    `$defs`, as `#` there is the OpenAPI document."""
    schema = TypeAdapter(annotation).json_schema(mode="serialization")
    definitions: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def event_stream_schema(events: Any) -> dict[str, Any]:
    """The schema of one Server-Sent Event whose `data` is JSON of one of `events` (OpenAPI
    3.1 has a text/event-stream's `schema` describe each event)."""
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": inline_schema(events),
            },
        },
        "required": ["data"],
    }


# --- API v1 request bodies ---------------------------------------------------------------------


class UserCreate(BaseModel):
    """`POST /v1/users`."""

    name: str = Field(
        description="trimmed; the rules of `POST /token`'s name",
        json_schema_extra=described(pattern=NAME_PATTERN),
    )


class ConversationCreate(BaseModel):
    """`POST /v1/conversations`: both optional (the name defaults to the account's)."""

    name: str | None = Field(default=None, json_schema_extra=described(pattern=NAME_PATTERN))
    title: str | None = Field(default=None, json_schema_extra=described(pattern=TITLE_PATTERN))


class TitleChange(BaseModel):
    """`PATCH /v1/conversations/{id}`."""

    title: str = Field(
        description=f"trimmed, 1 to {MAX_TITLE_CHARS} characters, no control characters",
        json_schema_extra=described(pattern=TITLE_PATTERN),
    )
