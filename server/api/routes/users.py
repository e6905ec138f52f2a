"""Accounts (API v1): registering, and who a key belongs to."""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Depends, HTTPException, Request

from core.models import ErrorBody, NewUser, User, UserCreate
from server.api.answers import BAD_NAME, RATE_LIMITED, UNAUTHORIZED
from server.api.auth import UserDep, bearer
from server.api.deps import ServicesDep
from server.api.guards import http_rate_limit
from server.api.routes.sessions import name_problem

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/users", tags=["accounts"])

REGISTRATION_CLOSED = "Registration needs the master token (REGISTRATION=admin)"


def registration_allowed(request: Request, services: ServicesDep) -> None:
    """REGISTRATION=admin: only the master token may register (403 otherwise, the master
    token unset included). Compared in constant time, as every credential."""
    settings = services.settings
    if settings.registration == "open":
        return
    master = settings.master_token
    credential = bearer(request, "master-token") or ""
    if master is None or not hmac.compare_digest(
        credential.encode(), master.get_secret_value().encode()
    ):
        raise HTTPException(403, detail=REGISTRATION_CLOSED)


@router.post(
    "",
    status_code=201,
    responses={
        400: BAD_NAME,
        403: {"model": ErrorBody, "description": REGISTRATION_CLOSED},
        429: RATE_LIMITED,
    },
    dependencies=[
        Depends(
            http_rate_limit("http-register", lambda settings: settings.rate_limit_register_requests)
        ),
        Depends(registration_allowed),
    ],
)
async def register(body: UserCreate, services: ServicesDep) -> NewUser:
    """A new account and its API key: shown this once, stored only as its SHA-256."""
    name = body.name.strip()
    problem = name_problem(name, services.settings.max_name_chars)
    if problem is not None:
        raise HTTPException(400, detail={"loc": "name", "msg": problem})
    user, api_key = await services.accounts.register(name)
    logger.info("account %s registered", user.user_id[:8])
    return NewUser(**user.model_dump(), api_key=api_key)


@router.get("/me", responses={401: UNAUTHORIZED})
async def me(user: UserDep) -> User:
    """The account the key opens."""
    return user
