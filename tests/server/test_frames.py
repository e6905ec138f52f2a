"""Every kind of client frame and what it becomes (the table in docs/protocol.md)."""

from __future__ import annotations

import pytest

from core.models import ErrorCode
from server.frames import ChatMessage, FrameError, StopGeneration, parse_frame

LIMIT = 20


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("hello", ChatMessage("hello")),
        ("  padded  \n", ChatMessage("padded")),
        ('{"type": "message", "msg": "hi"}', ChatMessage("hi")),
        ('{"type": "message", "msg": "hi", "client_id": "c1"}', ChatMessage("hi", "c1")),
        ('{"type": "stop"}', StopGeneration()),
        ('  {"type":"stop"}  ', StopGeneration()),
        # JSON that is not a command is just text someone typed.
        ('{"a": 1}', ChatMessage('{"a": 1}')),
        ("{not json", ChatMessage("{not json")),
        ("[1, 2]", ChatMessage("[1, 2]")),
        ("x" * LIMIT, ChatMessage("x" * LIMIT)),
    ],
)
def test_accepted_frames(frame: str, expected: object) -> None:
    assert parse_frame(frame, LIMIT) == expected


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        ("", ErrorCode.BAD_REQUEST, "empty"),
        ("   \n\t", ErrorCode.BAD_REQUEST, "empty"),
        ("x" * (LIMIT + 1), ErrorCode.TOO_LARGE, "limit is 20"),
        ('{"type": "message", "msg": "   "}', ErrorCode.BAD_REQUEST, "empty"),
        ('{"type": "message", "msg": 5}', ErrorCode.BAD_REQUEST, "string"),
        ('{"type": "message"}', ErrorCode.BAD_REQUEST, "string"),
        ('{"type": "dance"}', ErrorCode.BAD_REQUEST, "Unknown command type 'dance'"),
        ('{"type": "message", "msg": "hi", "client_id": 7}', ErrorCode.BAD_REQUEST, "client_id"),
        ('{"type": "message", "msg": "hi", "client_id": ""}', ErrorCode.BAD_REQUEST, "client_id"),
        ('{"type": "stop", ', ErrorCode.BAD_REQUEST, "Malformed JSON command"),
        ('{"type": "message", "msg": "x" * 99}', ErrorCode.BAD_REQUEST, "Malformed"),
    ],
)
def test_rejected_frames(frame: str, code: ErrorCode, words: str) -> None:
    result = parse_frame(frame, LIMIT)
    assert isinstance(result, FrameError)
    assert result.code is code
    assert words in result.detail


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type": "message", "msg": " ", "client_id": "c9"}', ErrorCode.BAD_REQUEST),
        ('{"type": "message", "msg": "%s", "client_id": "c9"}' % ("x" * 21), ErrorCode.TOO_LARGE),
    ],
)
def test_a_refused_message_command_keeps_its_client_id(frame: str, code: ErrorCode) -> None:
    refused = parse_frame(frame, LIMIT)
    assert isinstance(refused, FrameError)
    assert (refused.code, refused.client_id) == (code, "c9")
