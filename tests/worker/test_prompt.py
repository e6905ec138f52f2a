from __future__ import annotations

import pytest

from core.models import ErrorCode, Message, ReplyError, Source
from worker.prompt import (
    StopSequenceFilter,
    build_prompt,
    chat_turns,
    conversation_until,
    unanswered,
)


def human(text: str) -> Message:
    return Message(source=Source.HUMAN, msg=text)


def bot(text: str, to: Message, *, error: bool = False) -> Message:
    failure = ReplyError(code=ErrorCode.MODEL_ERROR, detail="boom") if error else None
    return Message(source=Source.BOT, msg=text, reply_to=to.id, error=failure)


def test_prompt_is_tagged_lines_ending_with_bot() -> None:
    h1 = human("Hi")
    history = [h1, bot("Hello!", h1), human("How are you?")]
    assert build_prompt(history) == "Human: Hi\nBot: Hello!\nHuman: How are you?\nBot:"


def test_chat_turns_use_roles_and_system_prompt() -> None:
    h1 = human("Hi")
    turns = chat_turns([h1, bot("Hello!", h1), human("More")], "Be brief.")
    assert turns == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "More"},
    ]
    assert chat_turns([h1], "")[0]["role"] == "user"


def test_conversation_puts_each_reply_after_its_message() -> None:
    h1, h2 = human("one"), human("two")
    b1 = bot("first answer", h1)
    # Stored in arrival order: the second message came before the first reply.
    stored = [h1, h2, b1]
    assert conversation_until(stored, h2.id) == [h1, b1, h2]
    assert conversation_until(stored, h1.id) == [h1]


def test_conversation_leaves_out_failed_replies() -> None:
    h1, h2 = human("one"), human("two")
    stored = [h1, bot("", h1, error=True), h2]
    assert conversation_until(stored, h2.id) == [h1, h2]


def test_conversation_of_unknown_message_raises() -> None:
    with pytest.raises(KeyError):
        conversation_until([human("x")], "nope")


def test_unanswered_counts_errors_as_answers() -> None:
    h1, h2, h3 = human("1"), human("2"), human("3")
    stored = [h1, h2, bot("a", h1), h3, bot("", h2, error=True)]
    assert unanswered(stored) == [h3]


@pytest.mark.parametrize(
    "pieces",
    [
        [" Paris", ".\n", "Hum", "an:", " and"],
        [" Paris.\nH", "uman: x"],
        [" Paris.\nHuman:"],
        [" Paris", ".", "\n", "H", "u", "m", "a", "n", ":", " more"],
    ],
)
def test_stop_filter_never_shows_the_stop_sequence(pieces: list[str]) -> None:
    cut = StopSequenceFilter("Human:")
    shown = [cut.feed(p) for p in pieces]
    shown.append(cut.flush())
    assert "".join(shown) == " Paris.\n"
    assert cut.stopped
    assert not any("H" in s for s in shown)


def test_stop_filter_releases_a_false_start() -> None:
    cut = StopSequenceFilter("Human:")
    shown = cut.feed("Hum") + cut.feed("ble pie") + cut.flush()
    assert shown == "Humble pie"
    assert not cut.stopped
    assert StopSequenceFilter().feed("Hu") == ""
