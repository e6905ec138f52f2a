"""What a client's WebSocket frame means: a chat message, a command, or a mistake.

A text frame is a chat message (so Postman works as in the tutorial). A frame that is a JSON
object with a `"type"` is a command instead; see docs/protocol.md for the table of inputs and
what each gets.

A chat message whose very first character is `/` is a slash command (`/help`, `/reset`,
`/stop`, `/title <text>`), whether it came as a plain frame or as a `message` command's
`msg`. Only the first character counts: `a/b` and ` /help` (a space first) are chat text, so
a slash inside a sentence, or a message someone indented, is never taken for a command. `//`
at the start escapes it: `//text` is the chat message `/text`.

Every error text quotes at most a short prefix of what the client sent: an error is queued on
the client's own socket, so an echo of a 1 MiB frame would let a client that does not read
pile up memory on the server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from core.models import MAX_TITLE_CHARS, ErrorCode

_LOOKS_LIKE_COMMAND = re.compile(r'^\{\s*"type"\s*:')
# Control characters (C0, DEL, C1) but newline and tab (a carriage return was made a newline
# before this is checked): they render as nothing or garble terminals and logs, and no
# keyboard types them.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
KNOWN_COMMANDS = ("message", "stop")
_FIRST_SPACE = re.compile(r"\s+")

MAX_CLIENT_ID_CHARS = 100
QUOTED_CHARS = 40  # the longest piece of client input an error text repeats
# A JSON string escape takes at most 6 characters per UTF-8 byte (`\u0041`), so a frame longer
# than this cannot hold a message within the byte limit: refused without parsing it.
_ESCAPE_FACTOR = 6
_FRAME_OVERHEAD = 1024  # the command's other keys and a client_id


@dataclass(frozen=True, slots=True)
class ChatMessage:
    text: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class StopGeneration:
    pass


@dataclass(frozen=True, slots=True)
class SlashCommand:
    """`/help`, `/reset`, `/stop` or `/title <text>` (`argument` is the title, else "")."""

    name: str
    argument: str = ""
    client_id: str | None = None  # of a `message` command, echoed in the answer


@dataclass(frozen=True, slots=True)
class FrameError:
    code: ErrorCode
    detail: str
    client_id: str | None = None  # of a refused message command, so the sender can match it


Frame = ChatMessage | StopGeneration | SlashCommand | FrameError

SLASH_COMMANDS = ("help", "reset", "stop", "title")
HELP = (
    "Commands: /help (this list), /reset (empty this conversation's history), /stop (stop the "
    "reply being generated), /title <text> (name this conversation). To send a message that "
    "starts with /, write // instead: //etc is sent as /etc."
)


def quoted(text: str) -> str:
    """`text` as an error repeats it: its first QUOTED_CHARS characters, an ellipsis if cut,
    in Python's quoting (so controls and lone surrogates come out as escapes)."""
    if len(text) > QUOTED_CHARS:
        return repr(text[:QUOTED_CHARS] + "…")
    return repr(text)


def parse_frame(text: str, max_chars: int, max_bytes: int) -> Frame:
    if len(text) > _ESCAPE_FACTOR * max_bytes + _FRAME_OVERHEAD:
        return FrameError(
            ErrorCode.TOO_LARGE,
            f"Frame is {len(text)} characters long; a message may have at most {max_chars}",
        )
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            command = json.loads(stripped)
        except RecursionError:
            return FrameError(ErrorCode.BAD_REQUEST, "Malformed JSON command: nested too deeply")
        except ValueError as exc:
            if _LOOKS_LIKE_COMMAND.match(stripped):
                return FrameError(ErrorCode.BAD_REQUEST, f"Malformed JSON command: {exc}")
            command = None
        if isinstance(command, dict) and "type" in command:
            return _parse_command(command, max_chars, max_bytes)
    return _chat_message(text, max_chars, max_bytes)


def _parse_command(
    command: dict[str, object], max_chars: int, max_bytes: int, *, slash_commands: bool = True
) -> Frame:
    kind = command["type"]
    if kind == "stop":
        return StopGeneration()
    if kind == "message":
        msg, client_id = command.get("msg"), command.get("client_id")
        if not isinstance(msg, str):
            return FrameError(ErrorCode.BAD_REQUEST, 'A "message" command needs a string "msg"')
        if client_id is not None and not _valid_client_id(client_id):
            return FrameError(
                ErrorCode.BAD_REQUEST,
                f'"client_id" must be a string of 1 to {MAX_CLIENT_ID_CHARS} characters, '
                "without control characters or lone surrogates",
            )
        assert client_id is None or isinstance(client_id, str)
        return _chat_message(msg, max_chars, max_bytes, client_id, slash_commands=slash_commands)
    known = ", ".join(KNOWN_COMMANDS)
    # Only a string is quoted: the repr of a huge or deeply nested value is itself a hazard.
    named = quoted(kind) if isinstance(kind, str) else f"(a JSON {_json_kind(kind)})"
    return FrameError(ErrorCode.BAD_REQUEST, f"Unknown command type {named}; known: {known}")


def _valid_client_id(client_id: object) -> bool:
    return (
        isinstance(client_id, str)
        and 0 < len(client_id) <= MAX_CLIENT_ID_CHARS
        and _unicode_problem(client_id) is None
    )


def _json_kind(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool) or value is None:
        return "literal"
    return "number"


def _chat_message(
    text: str,
    max_chars: int,
    max_bytes: int,
    client_id: str | None = None,
    *,
    slash_commands: bool = True,
) -> Frame:
    # CRLF (Windows clients) and a lone CR are line ends: stored as newlines, never refused.
    # Whether it is a slash command is decided before trimming: " /help" is text.
    slash = slash_commands and text.startswith("/")
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        return FrameError(ErrorCode.BAD_REQUEST, "Message is empty", client_id)
    if len(text) > max_chars:
        return FrameError(
            ErrorCode.TOO_LARGE,
            f"Message is {len(text)} characters long; the limit is {max_chars}",
            client_id,
        )
    problem = _unicode_problem(text)
    if problem is not None:
        return FrameError(ErrorCode.BAD_REQUEST, problem, client_id)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        return FrameError(
            ErrorCode.TOO_LARGE,
            f"Message is {size} bytes long (UTF-8); the limit is {max_bytes}",
            client_id,
        )
    if slash:
        return _slash_command(text, client_id)
    return ChatMessage(text, client_id)


def _slash_command(text: str, client_id: str | None) -> Frame:
    """`text` (valid chat text, starting with `/`) as a command, or `//...` as chat text."""
    if text.startswith("//"):
        return ChatMessage(text[1:], client_id)
    word, *rest = _FIRST_SPACE.split(text[1:], maxsplit=1)
    name, argument = word.lower(), rest[0].strip() if rest else ""
    if name not in SLASH_COMMANDS:
        return FrameError(
            ErrorCode.BAD_REQUEST,
            f"Unknown command {quoted('/' + word)}; send /help for the list, or // to send a "
            "message that starts with /",
            client_id,
        )
    if name != "title":
        if argument:
            return FrameError(
                ErrorCode.BAD_REQUEST, f"/{name} takes no argument; send /help", client_id
            )
        return SlashCommand(name, client_id=client_id)
    argument = " ".join(argument.split())  # a title is one line
    if not argument:
        return FrameError(ErrorCode.BAD_REQUEST, "/title needs a title: /title <text>", client_id)
    if len(argument) > MAX_TITLE_CHARS:
        return FrameError(
            ErrorCode.BAD_REQUEST,
            f"The title is {len(argument)} characters long; the limit is {MAX_TITLE_CHARS}",
            client_id,
        )
    return SlashCommand(name, argument, client_id)


def _unicode_problem(text: str) -> str | None:
    """Why `text` cannot be stored and sent as UTF-8 text, or None."""
    control = CONTROL.search(text)
    if control is not None:
        return (
            f"Message contains the control character U+{ord(control.group()):04X}; "
            "only newline and tab are allowed"
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"Message contains a lone surrogate (U+{ord(text[exc.start]):04X}) at "
                f"character {exc.start}: it is not valid Unicode text"
            )
    return None


def parse_message(
    msg: str, client_id: str | None, max_chars: int, max_bytes: int
) -> ChatMessage | FrameError:
    """A chat message sent some other way than a frame (POST /v1/chat): the rules of a
    `message` command, so both ways refuse the same texts with the same errors. Slash
    commands are the socket's: over HTTP a text that starts with `/` is a chat message."""
    command: dict[str, object] = {"type": "message", "msg": msg}
    if client_id is not None:
        command["client_id"] = client_id
    parsed = _parse_command(command, max_chars, max_bytes, slash_commands=False)
    assert isinstance(parsed, ChatMessage | FrameError)
    return parsed
