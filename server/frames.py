"""What a client's WebSocket frame means: a chat message, a command, or a mistake.

A text frame is a chat message (so Postman works as in the tutorial). A frame that is a JSON
object with a `"type"` is a command instead; see docs/protocol.md for the table of inputs and
what each gets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from core.models import ErrorCode

_LOOKS_LIKE_COMMAND = re.compile(r'^\{\s*"type"\s*:')
KNOWN_COMMANDS = ("message", "stop")


MAX_CLIENT_ID_CHARS = 100


@dataclass(frozen=True, slots=True)
class ChatMessage:
    text: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class StopGeneration:
    pass


@dataclass(frozen=True, slots=True)
class FrameError:
    code: ErrorCode
    detail: str
    client_id: str | None = None  # of a refused message command, so the sender can match it


Frame = ChatMessage | StopGeneration | FrameError


def parse_frame(text: str, max_chars: int) -> Frame:
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            command = json.loads(stripped)
        except ValueError as exc:
            if _LOOKS_LIKE_COMMAND.match(stripped):
                return FrameError(ErrorCode.BAD_REQUEST, f"Malformed JSON command: {exc}")
            command = None
        if isinstance(command, dict) and "type" in command:
            return _parse_command(command, max_chars)
    return _chat_message(text, max_chars)


def _parse_command(command: dict[str, object], max_chars: int) -> Frame:
    kind = command["type"]
    if kind == "stop":
        return StopGeneration()
    if kind == "message":
        msg, client_id = command.get("msg"), command.get("client_id")
        if not isinstance(msg, str):
            return FrameError(ErrorCode.BAD_REQUEST, 'A "message" command needs a string "msg"')
        if client_id is not None and not (
            isinstance(client_id, str) and 0 < len(client_id) <= MAX_CLIENT_ID_CHARS
        ):
            return FrameError(
                ErrorCode.BAD_REQUEST,
                f'"client_id" must be a string of 1 to {MAX_CLIENT_ID_CHARS} characters',
            )
        return _chat_message(msg, max_chars, client_id)
    known = ", ".join(KNOWN_COMMANDS)
    return FrameError(ErrorCode.BAD_REQUEST, f"Unknown command type {kind!r}; known: {known}")


def _chat_message(text: str, max_chars: int, client_id: str | None = None) -> Frame:
    text = text.strip()
    if not text:
        return FrameError(ErrorCode.BAD_REQUEST, "Message is empty", client_id)
    if len(text) > max_chars:
        return FrameError(
            ErrorCode.TOO_LARGE,
            f"Message is {len(text)} characters long; the limit is {max_chars}",
            client_id,
        )
    return ChatMessage(text, client_id)
