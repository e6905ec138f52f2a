"""The fault suite's counting (tests/support/ledger.py) on hand-made histories and frames: each
kind of damage is counted where it should be, so a fault run that passes means something."""

from __future__ import annotations

import copy
from typing import Any

from core.models import new_id
from tests.support.chat_client import ChatUser, SocketLog
from tests.support.ledger import FaultRun, tally


def conversation(texts: list[str]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for text in texts:
        human = {"id": new_id(), "source": "human", "msg": text}
        messages += [human, {"id": new_id(), "source": "bot", "msg": f"echo: {text}",
                             "reply_to": human["id"]}]  # fmt: skip
    return messages


def user_with(history: list[dict[str, Any]], texts: list[str]) -> ChatUser:
    """A user that sent `texts` and whose one socket got the ack and final of each."""
    user = ChatUser("u", list)
    user.texts = list(texts)
    log = SocketLog("http://server")
    for message in history:
        if message["source"] == "human":
            log.events.append({"type": "ack", "id": message["id"], "msg": message["msg"]})
        else:
            log.events.append({"type": "message", **message})
    user.sockets.append(log)
    return user


def count(histories: list[list[dict[str, Any]]], users: list[ChatUser]) -> FaultRun:
    return tally("unit", users, histories, 0.0, record=False)


def two_sessions() -> tuple[list[list[dict[str, Any]]], list[ChatUser]]:
    texts = [["a1", "a2", "a3"], ["b1", "b2"]]
    histories = [conversation(t) for t in texts]
    users = [user_with(h, t) for h, t in zip(histories, texts, strict=True)]
    return histories, users


def test_a_clean_run_counts_every_message_answered_once() -> None:
    histories, users = two_sessions()
    run = count(histories, users)
    assert (run.sent, run.stored, run.answered) == (5, 5, 5)
    run.assert_clean()


def test_a_message_without_its_reply_is_lost() -> None:
    histories, users = two_sessions()
    del histories[0][-1]  # the reply to a3
    run = count(histories, users)
    assert (run.lost, run.answered) == (1, 4)


def test_a_message_missing_from_the_history_is_lost() -> None:
    histories, users = two_sessions()
    del histories[1][2:]  # b2 and its reply
    assert count(histories, users).lost == 1


def test_two_replies_to_one_message_and_a_phantom_final_are_duplicates() -> None:
    histories, users = two_sessions()
    extra = copy.deepcopy(histories[0][1])
    extra["id"] = new_id()
    histories[0].append(extra)
    users[1].sockets[0].events.append({**histories[1][1], "type": "message", "id": new_id()})
    assert count(histories, users).duplicated == 2


def test_an_event_of_another_session_is_misdelivered() -> None:
    histories, users = two_sessions()
    users[0].sockets[0].events.append({"type": "token", "reply_to": histories[1][0]["id"]})
    users[1].sockets[0].events.append({"type": "ack", "id": histories[0][0]["id"], "msg": "a1"})
    assert count(histories, users).misdelivered == 2


def test_replies_out_of_order_are_counted_in_history_and_on_sockets() -> None:
    histories, users = two_sessions()
    session = histories[0]
    session[1], session[3] = session[3], session[1]  # reply to a2 stored before reply to a1
    assert count(histories, users).out_of_order == 1
    # And the socket that received the finals in that order counts once more.
    users[0] = user_with(session, users[0].texts)
    assert count(histories, users).out_of_order == 2


def test_replies_known_only_from_the_history_and_wrong_texts_are_counted() -> None:
    histories, users = two_sessions()
    users[0].sockets[0].events = [e for e in users[0].sockets[0].events if e["type"] == "ack"]
    histories[1][-1]["msg"] = "echo: something else"
    run = count(histories, users)
    assert (run.history_only, run.wrong_text) == (3, 1)
