"""From session history to model input, the tutorial's way and the chat-role way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

from core.models import Message

HUMAN_TAG = "Human:"
BOT_TAG = "Bot:"
# Starts the newest message when it had to be cut to fit the context (its start is gone).
CUT_MARK = "[…] "


class ChatTurn(TypedDict):
    role: str
    content: str


def conversation_until(messages: Sequence[Message], human_id: str) -> list[Message]:
    """The conversation as the model should see it when answering `human_id`.

    History is stored in arrival order, so a quick second message can sit before the reply to
    the first (`h1 h2 b1`). The model sees each human message followed by its reply, up to and
    including `human_id`; failed and empty (stopped at once) replies are left out.
    """
    replies = {m.reply_to: m for m in messages if not m.is_human and m.error is None and m.msg}
    ordered: list[Message] = []
    for message in messages:
        if not message.is_human:
            continue
        ordered.append(message)
        if message.id == human_id:
            return ordered
        reply = replies.get(message.id)
        if reply is not None:
            ordered.append(reply)
    raise KeyError(human_id)


def unanswered(messages: Sequence[Message]) -> list[Message]:
    """Human messages with no stored reply (or error), oldest first."""
    answered = {m.reply_to for m in messages if not m.is_human}
    return [m for m in messages if m.is_human and m.id not in answered]


def fit_history(
    history: Sequence[Message], measure: Callable[[Sequence[Message]], int], budget: int
) -> list[Message]:
    """The newest messages of `history` (which ends with the message to answer) whose prompt
    `measure`s at most `budget` tokens: the oldest are dropped first.

    When the newest message alone is over the budget, it is cut, keeping its end (marked with
    CUT_MARK): a long paste is usually followed by what the user asks about it ("... summarise
    this"), and the end is also what the reply continues from. Its longest end that fits is
    found by bisection, each step measured in full, so it holds for any tokenizer. ValueError
    when not even an empty message fits (the system prompt takes the whole budget).
    """
    kept = list(history)
    while len(kept) > 1 and measure(kept) > budget:
        kept.pop(0)
    if not kept or measure(kept) <= budget:
        return kept
    newest = kept[-1]

    def cut(chars: int) -> list[Message]:
        text = newest.msg[len(newest.msg) - chars :] if chars else ""
        return [newest.model_copy(update={"msg": CUT_MARK + text.lstrip()})]

    low, high = 0, len(newest.msg)  # `low` characters fit; `high + 1` do not
    if measure(cut(0)) > budget:
        raise ValueError(
            f"The prompt does not fit the model's context: even without the message it takes "
            f"more than the {budget} tokens left after the reply's room; shorten SYSTEM_PROMPT "
            "or raise the context setting"
        )
    while low < high:
        middle = (low + high + 1) // 2
        if measure(cut(middle)) <= budget:
            low = middle
        else:
            high = middle - 1
    return cut(low)


def build_prompt(history: Sequence[Message]) -> str:
    """The tutorial's prompt: tagged lines, one per message, then `Bot:` for the model."""
    lines = [f"{HUMAN_TAG if m.is_human else BOT_TAG} {m.msg}" for m in history]
    lines.append(BOT_TAG)
    return "\n".join(lines)


def chat_turns(history: Sequence[Message], system_prompt: str) -> list[ChatTurn]:
    """The same history as chat-completion turns, for backends that speak roles."""
    turns: list[ChatTurn] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns.extend({"role": "user" if m.is_human else "assistant", "content": m.msg} for m in history)
    return turns


class StopSequenceFilter:
    """Streams deltas through, holding back any tail that may be the start of a stop sequence.

    Once the stop sequence appears, everything from it on is dropped and `stopped` turns true,
    so a client never sees "Human:" flash up and disappear.
    """

    def __init__(self, stop: str = HUMAN_TAG) -> None:
        self._stop = stop
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._pending + delta
        cut = text.find(self._stop)
        if cut != -1:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        keep = 0
        for size in range(min(len(self._stop) - 1, len(text)), 0, -1):
            if self._stop.startswith(text[-size:]):
                keep = size
                break
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return "" if self.stopped else rest
