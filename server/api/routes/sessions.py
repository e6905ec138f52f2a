"""Starting a session and reading it back (the client's recovery path after a disconnect)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException

from core.models import Session, short
from server.api.deps import SettingsDep, StoreDep

logger = logging.getLogger(__name__)
router = APIRouter(tags=["sessions"])

SESSION_MISSING = "Session expired or does not exist"


@router.post(
    "/token",
    response_model_exclude_none=True,
    responses={400: {"description": "Blank or over-long name"}},
)
async def token_generator(name: str, store: StoreDep, settings: SettingsDep) -> Session:
    """Start a chat session for `name`: a UUID4 token and an empty history, with a TTL."""
    name = name.strip()
    if not name:
        raise HTTPException(400, detail={"loc": "name", "msg": "Enter a valid name"})
    if len(name) > settings.max_name_chars:
        raise HTTPException(
            400,
            detail={
                "loc": "name",
                "msg": f"Enter a valid name (at most {settings.max_name_chars} characters)",
            },
        )
    session = await store.create(name)
    logger.info("session %s started", short(session.token))
    return session


@router.get(
    "/refresh_token",
    response_model_exclude_none=True,
    responses={400: {"description": SESSION_MISSING}},
)
async def refresh_token(token: str, store: StoreDep) -> Session:
    """The whole session with its history, oldest first; renews the session's TTL."""
    session = await store.get(token)
    if session is None:
        raise HTTPException(400, detail=SESSION_MISSING)
    return session
