from __future__ import annotations

from collections.abc import Sequence

import pytest

from core.models import ErrorCode, Message, ReplyError, Source
from worker.prompt import (
    CUT_MARK,
    StopSequenceFilter,
    build_prompt,
    chat_turns,
    conversation_until,
    fit_history,
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


# --- Fitting the context -------------------------------------------------------------------------


def chars(history: Sequence[Message]) -> int:
    """A tokenizer for tests: one token per character, plus 2 per message."""
    return sum(len(m.msg) + 2 for m in history)


def test_the_newest_messages_that_fit_are_kept() -> None:
    h1 = human("a" * 10)
    h2 = human("b" * 10)
    history = [h1, bot("c" * 10, h1), h2, bot("d" * 10, h2), human("e" * 10)]
    assert fit_history(history, chars, 60) == history
    assert fit_history(history, chars, 59) == history[1:]
    assert fit_history(history, chars, 36) == history[-3:]
    assert fit_history(history, chars, 12) == history[-1:]


def test_the_newest_message_alone_too_long_keeps_its_end() -> None:
    newest = human("start " + "x" * 50 + " the question?")
    fitted = fit_history([human("old"), newest], chars, 30)
    assert len(fitted) == 1 and chars(fitted) <= 30
    assert chars(fitted) == 30  # the longest end that fits
    assert fitted[0].msg.startswith(CUT_MARK) and fitted[0].msg.endswith(" the question?")
    assert fitted[0].id == newest.id
    assert newest.msg.startswith("start ")  # the stored message is untouched


def test_nothing_fits_when_the_budget_is_below_an_empty_message() -> None:
    with pytest.raises(ValueError, match="does not fit the model's context"):
        fit_history([human("hello")], chars, len(CUT_MARK) + 1)
