"""Counting what a fault run did to the messages, from the final histories and every frame.

Every fault test drives `ChatUser`s (tests/support/chat_client.py), then calls `tally()`,
which returns a `FaultRun` with the figures the issue asks for and records it in `RUNS`;
tests/system/conftest.py prints `RUNS` as a table at the end of the pytest run and writes it
to `.reports/faults.json`.

Definitions (per session, summed):
- sent: messages the user wanted to send (each is sent until it is known to be stored);
- stored: of those, how many are in the final history as a human entry;
- answered: stored messages with a bot entry (a reply or an error entry);
- lost: sent messages missing from the final history, or stored without a bot entry;
- duplicated: extra human entries for one text, extra bot entries for one message, and final
  events that a socket received for a reply other than the stored one (a phantom answer);
- misdelivered: events a socket received whose `id` (ack) or `reply_to` is not one of its own
  session's messages;
- out_of_order: bot entries not in the order of the messages they answer, plus sockets that
  received final events out of that order;
- history_only: answered messages whose final event no socket of the session received (the
  client learned the reply from `/refresh_token`): normal after a disconnect, a bug otherwise.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.support.chat_client import FINAL, ChatUser


@dataclass
class FaultRun:
    fault: str
    sessions: int
    sent: int
    stored: int
    answered: int
    lost: int
    duplicated: int
    misdelivered: int
    out_of_order: int
    history_only: int
    wrong_text: int
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    resent: int = 0
    seconds: float = 0.0
    notes: str = ""

    def assert_clean(self, *, history_only: bool = True) -> None:
        """Every message answered exactly once, in order, to its own session only."""
        problems = {
            name: getattr(self, name)
            for name in ("lost", "duplicated", "misdelivered", "out_of_order", "wrong_text")
            if getattr(self, name)
        }
        if history_only and self.history_only:
            problems["history_only"] = self.history_only
        assert self.answered == self.sent == self.stored, self
        assert not problems, f"{self.fault}: {problems} in {self}"


RUNS: list[FaultRun] = []


def echo(text: str) -> str:
    """The reply the protocol model server gives to `text`."""
    return f"echo: {text}"


def tally(
    fault: str,
    users: Sequence[ChatUser],
    histories: Sequence[list[dict[str, Any]]],
    seconds: float,
    *,
    expected: Callable[[str], str | None] = echo,
    notes: str = "",
    record: bool = True,
) -> FaultRun:
    """The figures of one run. `expected(text)` is the reply text a message must get, or None
    when it must get an error entry instead (any text is then a wrong answer). `record`: add
    the run to the table printed at the end."""
    run = FaultRun(fault, len(users), 0, 0, 0, 0, 0, 0, 0, 0, 0, notes=notes)
    errors: Counter[str] = Counter()
    for user, messages in zip(users, histories, strict=True):
        run.sent += len(user.texts)
        run.reconnects += user.reconnects
        run.resent += user.resent
        humans = [m for m in messages if m["source"] == "human"]
        bots: dict[str, list[dict[str, Any]]] = {}
        for message in messages:
            if message["source"] == "bot":
                bots.setdefault(message.get("reply_to") or "", []).append(message)
        by_text = Counter(h["msg"] for h in humans)
        own_ids = {h["id"] for h in humans}
        order = {h["id"]: i for i, h in enumerate(humans)}
        heard = {
            e["reply_to"]
            for log in user.sockets
            for e in log.events
            if e["type"] in FINAL and e.get("reply_to")
        }
        for text in user.texts:
            copies = by_text.get(text, 0)
            if copies == 0:
                run.lost += 1
                continue
            run.stored += 1
            run.duplicated += copies - 1
            human = next(h for h in humans if h["msg"] == text)
            replies = bots.get(human["id"], [])
            if not replies:
                run.lost += 1
                continue
            run.answered += 1
            run.duplicated += len(replies) - 1
            reply = replies[0]
            if human["id"] not in heard:
                run.history_only += 1
            want = expected(text)
            if reply.get("error"):
                errors[reply["error"]["code"]] += 1
                run.wrong_text += want is not None
            else:
                run.wrong_text += want is None or reply["msg"] != want
        # Replies in the order of the messages they answer.
        reply_order = [order[b["reply_to"]] for b in messages if b.get("reply_to") in order]
        run.out_of_order += sum(1 for a, b in itertools.pairwise(reply_order) if b < a)
        stored_reply = {rt: rs[0]["id"] for rt, rs in bots.items()}
        for log in user.sockets:
            finals_seen: list[int] = []
            for event in log.events:
                target = event["id"] if event["type"] == "ack" else event.get("reply_to")
                if target is None:
                    continue  # a socket-level error (bad frame, service_unavailable)
                if target not in own_ids:
                    run.misdelivered += 1
                    continue
                if event["type"] in FINAL:
                    finals_seen.append(order[target])
                    if event["type"] == "message" and stored_reply.get(target) != event["id"]:
                        run.duplicated += 1
            run.out_of_order += sum(1 for a, b in itertools.pairwise(finals_seen) if b <= a)
    run.errors = dict(sorted(errors.items()))
    run.seconds = round(seconds, 1)
    if record:
        RUNS.append(run)
    return run


def write_report(path: Path, runs: Sequence[Any]) -> None:
    """The runs (dataclasses: fault runs, hostile runs) as a JSON list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n", encoding="utf-8")


COLUMNS = (
    "fault",
    "sessions",
    "sent",
    "answered",
    "lost",
    "duplicated",
    "misdelivered",
    "out_of_order",
    "history_only",
    "reconnects",
    "errors",
    "seconds",
    "notes",
)


def table(runs: Sequence[FaultRun]) -> list[str]:
    rows = [list(COLUMNS)]
    for run in runs:
        values = asdict(run)
        values["errors"] = ",".join(f"{k}:{v}" for k, v in run.errors.items()) or "-"
        rows.append([str(values[c]) for c in COLUMNS])
    return aligned(rows)


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells (the first one the header) as lines with the columns aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
