"""Conversations (API v1): a conversation is a session, its id the session token.

Who may touch one is server/api/auth.py's `conversation_for`: its owner's key, or for an
anonymous one its own token; anything else is 404, never 403, so ids cannot be probed.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response

from core.conversations import CURSOR_PATTERN, BadCursor
from core.models import (
    MAX_TITLE_CHARS,
    ConversationCreate,
    ConversationPage,
    ConversationSummary,
    Session,
    TitleChange,
    short,
)
from server.api.answers import (
    BAD_CURSOR,
    BAD_NAME,
    BAD_TITLE,
    MISSING,
    NO_CONTENT,
    RATE_LIMITED,
    UNAUTHORIZED,
)
from server.api.auth import CONVERSATION_MISSING, CallerDep, UserDep, conversation_for
from server.api.deps import ServicesDep
from server.api.guards import http_rate_limit
from server.api.routes.sessions import name_problem

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

ANONYMOUS_NAME = "Anonymous"
ConversationId = Annotated[str, Path(description="the session token (a UUID4)")]


def title_problem(title: str) -> str | None:
    """The name rules, with the title's limit and its own word."""
    problem = name_problem(title, MAX_TITLE_CHARS)
    return None if problem is None else problem.replace("valid name", "valid title")


def checked_title(title: str) -> str:
    title = title.strip()
    if (problem := title_problem(title)) is not None:
        raise HTTPException(400, detail={"loc": "title", "msg": problem})
    return title


@router.post(
    "",
    status_code=201,
    response_model_exclude_none=True,
    responses={400: BAD_NAME, 401: UNAUTHORIZED, 429: RATE_LIMITED},
    # The same budget as POST /token: either way, a new session.
    dependencies=[
        Depends(http_rate_limit("http-token", lambda settings: settings.rate_limit_token_requests))
    ],
)
async def create_conversation(
    body: ConversationCreate, caller: CallerDep, services: ServicesDep
) -> Session:
    """A new conversation, owned by the key's user, else anonymous (its token is its key).
    The name defaults to the account's name (or "Anonymous")."""
    user = caller.user
    default = user.name if user else ANONYMOUS_NAME
    # Given, a name follows the rules of /token (a blank one is refused, not defaulted).
    name = default if body.name is None else body.name.strip()
    if (problem := name_problem(name, services.settings.max_name_chars)) is not None:
        raise HTTPException(400, detail={"loc": "name", "msg": problem})
    title = None if body.title is None else checked_title(body.title)
    session = await services.store.create(name, user_id=user.user_id if user else None, title=title)
    logger.info("conversation %s started", short(session.token))
    return session


@router.get("", responses={400: BAD_CURSOR, 401: UNAUTHORIZED})
async def list_conversations(
    user: UserDep,
    services: ServicesDep,
    limit: Annotated[int | None, Query(ge=1, le=100, description="rows per page")] = None,
    cursor: Annotated[
        str | None,
        Query(
            description="`next_cursor` of the previous page",
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
    ] = None,
) -> ConversationPage:
    """The account's conversations, newest activity first (keyset pagination: stable while
    conversations are added or move up). Entries whose conversation expired or was deleted
    are dropped from the index as they are met (docs/architecture.md)."""
    size = limit or services.settings.conversations_page_size
    try:
        page = await services.store.index.page(user.user_id, size, cursor)
    except BadCursor as exc:
        raise HTTPException(400, detail=str(exc)) from exc
    tokens = [entry.token for entry in page.entries]
    documents = await _summaries(services, tokens)
    rows: list[ConversationSummary] = []
    gone: list[str] = []
    for entry, found in zip(page.entries, documents, strict=True):
        if found is None:
            gone.append(entry.token)
            continue
        title, start, count = found
        updated = datetime.fromtimestamp(entry.updated_ms / 1000, UTC)
        rows.append(
            ConversationSummary(
                conversation_id=entry.token,
                title=title,
                created=start,
                updated=updated,
                message_count=count,
            )
        )
    if gone:
        await services.store.index.remove(user.user_id, *gone)
    return ConversationPage(conversations=rows, next_cursor=page.next_cursor)


async def _summaries(
    services: ServicesDep, tokens: list[str]
) -> list[tuple[str | None, datetime, int] | None]:
    """Title, start and message count of each session, in one pipeline; None for one that
    is gone."""
    keys = services.keys
    async with services.redis.pipeline(transaction=False) as pipe:
        for token in tokens:
            pipe.execute_command("JSON.GET", keys.session(token), "$.title", "$.session_start")
            pipe.execute_command("JSON.ARRLEN", keys.session(token), "$.messages")
        replies: list[Any] = await pipe.execute(raise_on_error=False) if tokens else []
    found: list[tuple[str | None, datetime, int] | None] = []
    for fields, lengths in zip(replies[::2], replies[1::2], strict=True):
        if fields is None or not isinstance(lengths, list) or not lengths:
            found.append(None)  # gone (JSON.ARRLEN answers an error for a missing key)
            continue
        values = json.loads(fields) if isinstance(fields, str) else fields
        titles, starts = values["$.title"], values["$.session_start"]
        found.append(
            (titles[0] if titles else None, datetime.fromisoformat(starts[0]), int(lengths[0]))
        )
    return found


@router.get(
    "/{conversation_id}",
    response_model_exclude_none=True,
    responses={401: UNAUTHORIZED, 404: MISSING},
)
async def get_conversation(
    conversation_id: ConversationId, caller: CallerDep, services: ServicesDep
) -> Session:
    """The session document (renewing its TTL, as `/refresh_token` does)."""
    return await conversation_for(caller, services, conversation_id)


@router.patch(
    "/{conversation_id}",
    response_model_exclude_none=True,
    responses={400: BAD_TITLE, 401: UNAUTHORIZED, 404: MISSING},
)
async def rename_conversation(
    conversation_id: ConversationId, body: TitleChange, caller: CallerDep, services: ServicesDep
) -> Session:
    """Set the title; every open socket of the conversation gets a `conversation` event."""
    session = await conversation_for(caller, services, conversation_id)
    title = checked_title(body.title)
    if not await services.store.set_title(session.token, title):
        raise HTTPException(404, detail=CONVERSATION_MISSING)
    session.title = title
    return session


@router.delete(
    "/{conversation_id}",
    status_code=204,
    response_class=Response,
    responses={204: NO_CONTENT, 401: UNAUTHORIZED, 404: MISSING},
)
async def delete_conversation(
    conversation_id: ConversationId, caller: CallerDep, services: ServicesDep
) -> None:
    """The document and everything about it are gone; its sockets get a `conversation`
    event `deleted` and close with 1008, and a reply being generated is stopped and never
    stored."""
    session = await conversation_for(caller, services, conversation_id)
    if not await services.store.delete(session.token):
        raise HTTPException(404, detail=CONVERSATION_MISSING)
    logger.info("conversation %s deleted", short(session.token))


@router.post(
    "/{conversation_id}/reset",
    response_model_exclude_none=True,
    responses={401: UNAUTHORIZED, 404: MISSING},
)
async def reset_conversation(
    conversation_id: ConversationId, caller: CallerDep, services: ServicesDep
) -> Session:
    """Empty the history (the title stays) and stop the reply in progress; a reply to a
    message from before the reset is not stored."""
    session = await conversation_for(caller, services, conversation_id)
    if not await services.store.reset(session.token):
        raise HTTPException(404, detail=CONVERSATION_MISSING)
    session.messages = []
    return session
