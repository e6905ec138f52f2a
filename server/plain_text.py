"""The socket's `?format=text` form: the tutorial's experience in Postman.

The tutorial's client saw one plain-text frame per reply. A socket opened with `?format=text`
gets exactly that: one frame with the text of each final reply (a stopped one ends with
STOPPED_MARK), one `error: <code>: <detail>` frame per error, and the answer to a slash
command as its plain text (the user typed it and waits for an answer). Everything else (acks,
token events, notices, conversation changes) is left out, and nothing is JSON.

The events still travel as JSON through Redis and the outbox, shared with the session's JSON
sockets; they are turned into text as they are sent, by `as_plain_text`.
"""

from __future__ import annotations

import json

from core.models import ACK_PREFIX, Session

STOPPED_MARK = " [stopped]"
# The frames a text socket never gets, told apart without parsing: the bulk of what a reply
# sends is token events, and acks come for every message.
_SKIPPED_PREFIXES = (ACK_PREFIX, '{"type":"token"', '{"type":"notice"', '{"type":"conversation"')


def as_plain_text(frame: str) -> str | None:
    """What a `?format=text` socket gets for this JSON event frame; None: nothing."""
    if frame.startswith(_SKIPPED_PREFIXES):
        return None
    try:
        event = json.loads(frame)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    if kind == "message":
        text = str(event.get("msg", ""))
        return (text + STOPPED_MARK).strip() if event.get("stopped") else text
    if kind == "error":
        return f"error: {event.get('code')}: {event.get('detail')}"
    if kind == "command":
        return str(event.get("detail", ""))
    return None


def transcript(session: Session) -> str:
    """`?history=1` on a text socket: the conversation so far in the tutorial's tagged lines
    (`Human: ...`, `Bot: ...`), or a line saying it is empty."""
    lines = []
    for message in session.messages:
        if message.is_human:
            lines.append(f"Human: {message.msg}")
        elif message.error is not None:
            lines.append(f"Bot: error: {message.error.code.value}: {message.error.detail}")
        else:
            lines.append(f"Bot: {message.msg}{STOPPED_MARK if message.stopped else ''}")
    return "\n".join(lines) if lines else "(no messages yet)"
