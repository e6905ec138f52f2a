"""Every kind of client frame and what it becomes (the table in docs/protocol.md)."""

from __future__ import annotations

import pytest

from core.models import MAX_TITLE_CHARS, ErrorCode
from server.frames import (
    ChatMessage,
    FrameError,
    SlashCommand,
    StopGeneration,
    parse_frame,
)

LIMIT = 20
BYTES = 30


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
    assert parse_frame(frame, LIMIT, BYTES) == expected


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
    result = parse_frame(frame, LIMIT, BYTES)
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
    refused = parse_frame(frame, LIMIT, BYTES)
    assert isinstance(refused, FrameError)
    assert (refused.code, refused.client_id) == (code, "c9")


# --- Hostile frames: bounded error texts, bytes, surrogates, nesting, control characters -------


def rejected(frame: str, max_chars: int = LIMIT, max_bytes: int = BYTES) -> FrameError:
    result = parse_frame(frame, max_chars, max_bytes)
    assert isinstance(result, FrameError), result
    return result


@pytest.mark.parametrize(
    "kind",
    [
        '"' + "x" * 10_000 + '\U0001f600"',  # the astral character makes the repr 4x bigger
        "[" + ", ".join(["1"] * 5000) + "]",
        "{" + ", ".join(f'"k{n}": {n}' for n in range(2000)) + "}",
    ],
)
def test_an_unknown_type_is_quoted_by_a_short_prefix_only(kind: str) -> None:
    refused = rejected('{"type": ' + kind + "}", max_chars=100_000, max_bytes=100_000)
    assert refused.code is ErrorCode.BAD_REQUEST
    assert refused.detail.startswith("Unknown command type")
    assert len(refused.detail) < 150


def test_a_quoted_prefix_is_marked_with_an_ellipsis() -> None:
    refused = rejected('{"type": "' + "y" * 100 + '"}', max_chars=1000, max_bytes=1000)
    assert ("y" * 40 + "…") in refused.detail
    assert "y" * 41 not in refused.detail


def test_a_short_unknown_type_is_quoted_whole() -> None:
    assert rejected('{"type": "dance"}').detail == (
        "Unknown command type 'dance'; known: message, stop"
    )


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"message","msg":"\\ud800"}',  # a lone surrogate: valid JSON, not Unicode text
        '{"type":"message","msg":"ok \\udfff ok"}',
        '{"type":"message","msg":"hi","client_id":"\\ud800"}',
    ],
)
def test_lone_surrogates_are_a_bad_request(frame: str) -> None:
    refused = rejected(frame)
    assert refused.code is ErrorCode.BAD_REQUEST
    assert "surrogate" in refused.detail or "client_id" in refused.detail


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}",
        '{"type": "message", "msg": "hi", "extra": ' + "[" * 3000 + "]" * 3000 + "}",
        '{"type": "message", "msg": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_deep_nesting_is_a_bad_request(frame: str) -> None:
    refused = rejected(frame, max_chars=10**6, max_bytes=10**6)
    assert refused.code is ErrorCode.BAD_REQUEST
    assert "nested" in refused.detail


def test_the_byte_limit_counts_utf8() -> None:
    assert parse_frame("é" * 15, LIMIT, BYTES) == ChatMessage("é" * 15)  # 30 bytes
    refused = rejected("é" * 16)  # 16 characters, 32 bytes
    assert refused.code is ErrorCode.TOO_LARGE
    assert refused.detail == "Message is 32 bytes long (UTF-8); the limit is 30"


@pytest.mark.parametrize(
    ("text", "named"),
    [("a\x00b", "U+0000"), ("bell\x07", "U+0007"), ("a\x1bb", "U+001B"), ("x\x85y", "U+0085")],
)
def test_control_characters_are_refused_and_named(text: str, named: str) -> None:
    refused = rejected(text)
    assert refused.code is ErrorCode.BAD_REQUEST
    assert named in refused.detail


def test_newline_and_tab_are_kept() -> None:
    assert parse_frame("one\ttwo\nthree", LIMIT, BYTES) == ChatMessage("one\ttwo\nthree")


def test_windows_and_old_mac_line_ends_become_newlines() -> None:
    """A client on Windows (Postman there, a textarea's form value) sends CRLF: it is a line
    end, not a control character to refuse."""
    assert parse_frame("one\r\ntwo\rthree", LIMIT, BYTES) == ChatMessage("one\ntwo\nthree")
    command = '{"type": "message", "msg": "a\\r\\nb"}'
    assert parse_frame(command, LIMIT, BYTES) == ChatMessage("a\nb")


def test_a_huge_frame_is_too_large_without_being_parsed() -> None:
    refused = rejected('{"type": "message", "msg": "' + "z" * 900_000 + '"}', 4000, 16384)
    assert refused.code is ErrorCode.TOO_LARGE
    assert len(refused.detail) < 150


# --- Slash commands -----------------------------------------------------------------------------

SLASH = 300  # room for a title at its limit


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("/help", SlashCommand("help")),
        ("/help\n", SlashCommand("help")),  # Postman's Enter
        ("/HELP", SlashCommand("help")),
        ("/reset", SlashCommand("reset")),
        ("/stop", SlashCommand("stop")),
        ("/title  Trip to   Rome ", SlashCommand("title", "Trip to Rome")),
        ("/title a\nb", SlashCommand("title", "a b")),
        ('{"type": "message", "msg": "/help"}', SlashCommand("help")),
        ('{"type":"message","msg":"/stop","client_id":"c2"}', SlashCommand("stop", "", "c2")),
        ("/title " + "t" * MAX_TITLE_CHARS, SlashCommand("title", "t" * MAX_TITLE_CHARS)),
        # Text, not commands: `//` escapes, and only a slash as the very first character counts.
        ("//help", ChatMessage("/help")),
        ("//", ChatMessage("/")),
        (
            '{"type": "message", "msg": "//reset now", "client_id": "c"}',
            ChatMessage("/reset now", "c"),
        ),
        ("a/b", ChatMessage("a/b")),
        (" /help", ChatMessage("/help")),
        ("\n/reset", ChatMessage("/reset")),
        ("1/2 of it", ChatMessage("1/2 of it")),
    ],
)
def test_slash_commands_and_what_stays_text(frame: str, expected: object) -> None:
    assert parse_frame(frame, SLASH, SLASH) == expected


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ("/dance", "Unknown command '/dance'; send /help"),
        ("/", "Unknown command '/'"),
        ("/path/to/file is broken", "Unknown command '/path/to/file'"),
        ("/title", "/title needs a title"),
        ("/title   \n ", "/title needs a title"),
        ("/title " + "t" * (MAX_TITLE_CHARS + 1), f"the limit is {MAX_TITLE_CHARS}"),
        ("/reset everything", "/reset takes no argument"),
        ("/help me", "/help takes no argument"),
    ],
)
def test_bad_slash_commands_are_bad_requests(frame: str, words: str) -> None:
    refused = rejected(frame, SLASH, SLASH)
    assert refused.code is ErrorCode.BAD_REQUEST
    assert words in refused.detail


def test_a_refused_slash_command_keeps_its_client_id() -> None:
    refused = rejected('{"type": "message", "msg": "/nope", "client_id": "c4"}', SLASH, SLASH)
    assert refused.client_id == "c4"
    assert "//" in refused.detail  # says how to send it as text


def test_a_slash_command_obeys_the_message_limits() -> None:
    assert rejected("/title " + "x" * LIMIT).code is ErrorCode.TOO_LARGE
    assert rejected("/title a\x00b", SLASH, SLASH).code is ErrorCode.BAD_REQUEST
