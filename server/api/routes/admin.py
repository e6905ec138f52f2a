"""Admin routes (API v1): only with MASTER_TOKEN, and absent (404) while it is unset."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response

from core.conversations import CURSOR_PATTERN, BadCursor
from core.models import ErrorBody, ServiceStats, UserPage, is_uuid4
from server.api.answers import BAD_CURSOR, NO_CONTENT, UNAUTHORIZED
from server.api.auth import INVALID_CREDENTIALS, require_master
from server.api.deps import ServicesDep

logger = logging.getLogger(__name__)

ADMIN_ANSWERS: dict[int | str, dict[str, Any]] = {
    401: {
        **UNAUTHORIZED,
        "description": f"No master token, or a wrong one: {INVALID_CREDENTIALS}",
    },
    404: {"model": ErrorBody, "description": "MASTER_TOKEN is unset: there are no admin routes"},
}
router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_master)],
    responses=ADMIN_ANSWERS,
)
USER_MISSING = "User not found"


@router.get("/stats")
async def stats(services: ServicesDep) -> ServiceStats:
    """Live sessions and open sockets (counted by a bounded SCAN: core/stats.py), live
    workers, and the queue: messages waiting, taken and the oldest waiting one's age."""
    return await services.stats.read()


@router.get("/users", responses={400: BAD_CURSOR})
async def list_users(
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100, description="rows per page")] = 20,
    cursor: Annotated[
        str | None,
        Query(
            description="`next_cursor` of the previous page",
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
    ] = None,
) -> UserPage:
    """Every account, oldest first."""
    try:
        users, next_cursor = await services.accounts.page(limit, cursor)
    except BadCursor as exc:
        raise HTTPException(400, detail=str(exc)) from exc
    return UserPage(users=users, next_cursor=next_cursor)


@router.delete(
    "/users/{user_id}",
    status_code=204,
    response_class=Response,
    responses={
        204: NO_CONTENT,
        404: {"model": ErrorBody, "description": f"{USER_MISSING}, or MASTER_TOKEN unset"},
    },
)
async def delete_user(
    user_id: Annotated[str, Path(description="the account's user_id")], services: ServicesDep
) -> None:
    """Revoke the key, then delete every conversation of the account, then its index.

    The order makes a crash in between harmless and repairable: once the key is revoked
    nobody can reach the conversations that are left (they expire with their TTL), and a
    repeated call finds the index still there and finishes the deletion (204 again). A
    conversation a request created in the instant before the revocation, after the index was
    read, is left to expire. Only an account with neither an account record nor an index is
    404."""
    revoked = await services.accounts.revoke(user_id)
    tokens = await services.store.index.tokens(user_id) if is_uuid4(user_id) else []
    if not revoked and not tokens:
        raise HTTPException(404, detail=USER_MISSING)
    for token in tokens:
        await services.store.delete(token)
    await services.store.index.drop(user_id)
    logger.info("account %s deleted with %d conversation(s)", user_id[:8], len(tokens))
