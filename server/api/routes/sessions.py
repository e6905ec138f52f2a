"""Starting a session and reading it back (the client's recovery path after a disconnect)."""

from __future__ import annotations

import logging
import unicodedata
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query

from core.models import Session, short
from server.api.auth import INVALID_CREDENTIALS, CallerDep
from server.api.deps import ServicesDep
from server.api.guards import http_rate_limit

logger = logging.getLogger(__name__)
router = APIRouter(tags=["sessions"])

SESSION_MISSING = "Session expired or does not exist"
LIMIT_HELP = "only the newest N messages (default: all of them, as the tutorial's clients expect)"
RATE_LIMITED = {
    "description": "Too many requests from this address; the Retry-After header says when to "
    "try again"
}


def name_problem(name: str, max_chars: int) -> str | None:
    """Why a (trimmed) name cannot be used, or None. The table is in docs/protocol.md:

    - blank, or nothing visible (only spaces and invisible format characters such as U+200B):
      refused;
    - longer than `max_chars` code points: refused;
    - control characters (NUL, tabs and newlines inside, C1 controls): refused;
    - U+FFFD or lone surrogates, which is what bytes that are not UTF-8 (`%ED%A0%80`) decode
      to: refused;
    - any other Unicode (letters of every script, RTL text and marks, emoji with joiners):
      kept exactly as sent.
    """
    categories = [unicodedata.category(char) for char in name]
    if all(category in ("Zs", "Zl", "Zp", "Cf", "Cc") for category in categories):
        return "Enter a valid name"
    if len(name) > max_chars:
        return f"Enter a valid name (at most {max_chars} characters)"
    if "Cc" in categories:
        return "Enter a valid name (no control characters)"
    if "Cs" in categories or "\ufffd" in name:
        return "Enter a valid name (it must be valid UTF-8 text)"
    return None


@router.post(
    "/token",
    response_model_exclude_none=True,
    responses={
        400: {"description": "Blank, over-long or unusable name"},
        401: {"description": f"An API key was sent that opens nothing: {INVALID_CREDENTIALS}"},
        429: RATE_LIMITED,
    },
    dependencies=[
        Depends(http_rate_limit("http-token", lambda settings: settings.rate_limit_token_requests))
    ],
)
async def token_generator(name: str, services: ServicesDep, caller: CallerDep) -> Session:
    """Start a chat session for `name`: a UUID4 token and an empty history, with a TTL.
    With an API key (`Authorization: Bearer` or `ACCESS-TOKEN`) it belongs to the key's
    user, as `POST /v1/conversations` does; without one it is anonymous, as ever."""
    name = name.strip()
    problem = name_problem(name, services.settings.max_name_chars)
    if problem is not None:
        raise HTTPException(400, detail={"loc": "name", "msg": problem})
    user_id = caller.user.user_id if caller.user is not None else None
    session = await services.store.create(name, user_id=user_id)
    logger.info("session %s started", short(session.token))
    return session


@router.get(
    "/refresh_token",
    response_model_exclude_none=True,
    responses={400: {"description": SESSION_MISSING}, 429: RATE_LIMITED},
    dependencies=[
        Depends(
            http_rate_limit("http-refresh", lambda settings: settings.rate_limit_refresh_requests)
        )
    ],
)
async def refresh_token(
    token: str,
    services: ServicesDep,
    limit: Annotated[int | None, Query(ge=1, description=LIMIT_HELP)] = None,
) -> Session:
    """The whole session with its history, oldest first (or only its newest `limit`
    messages); renews the session's TTL. Large answers are gzipped for clients that accept it
    (docs/protocol.md has the worst case)."""
    session = await services.store.get(token)
    if session is None:
        raise HTTPException(400, detail=SESSION_MISSING)
    if limit is not None and len(session.messages) > limit:
        session.messages = session.messages[-limit:]
    return session
