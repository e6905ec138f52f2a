from __future__ import annotations

import json
import uuid

import pytest

from core.models import (
    ErrorCode,
    Message,
    ReplyError,
    Source,
    client_message_id,
    dump_event,
    is_uuid4,
    reply_event,
    short,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (str(uuid.uuid4()), True),
        (str(uuid.uuid4()).upper(), False),
        (str(uuid.uuid1()), False),
        ("not-a-token", False),
        ("", False),
        ("*", False),
        ("../../etc", False),
    ],
)
def test_is_uuid4(value: str, expected: bool) -> None:
    assert is_uuid4(value) is expected


def test_short_hides_most_of_a_token() -> None:
    token = str(uuid.uuid4())
    assert short(token) == token[:8] + "…"


def test_reply_event_for_a_reply_and_for_an_error() -> None:
    to = str(uuid.uuid4())
    reply = Message(source=Source.BOT, msg="Hi", reply_to=to)
    event = json.loads(dump_event(reply_event(reply)))
    assert event == {
        "type": "message",
        "id": reply.id,
        "reply_to": to,
        "source": "bot",
        "msg": "Hi",
        "timestamp": event["timestamp"],
    }
    assert event["timestamp"].endswith("Z")

    failed = Message(
        source=Source.BOT,
        msg="",
        reply_to=to,
        error=ReplyError(code=ErrorCode.TIMEOUT, detail="too slow"),
    )
    assert json.loads(dump_event(reply_event(failed))) == {
        "type": "error",
        "reply_to": to,
        "code": "timeout",
        "detail": "too slow",
    }


def test_a_client_message_id_is_a_uuid4_fixed_by_session_and_client_id() -> None:
    token = str(uuid.uuid4())
    first = client_message_id(token, "m-1")
    assert is_uuid4(first)
    assert first == client_message_id(token, "m-1")
    assert first != client_message_id(token, "m-2")
    assert first != client_message_id(str(uuid.uuid4()), "m-1")
