"""Who is calling (API v1): an API key, a conversation's own token, or the master token.

docs/protocol.md "Credentials" is the contract. A conversation someone may not touch is
answered 404, exactly like one that does not exist, so ids cannot be probed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from core.accounts import API_KEY_PREFIX
from core.models import Session, User, is_uuid4
from server.api.deps import Services, ServicesDep

CONVERSATION_MISSING = "Conversation not found"
INVALID_CREDENTIALS = "Invalid credentials"
KEY_REQUIRED = "An API key is required (Authorization: Bearer <api_key>)"
CHALLENGE = {"WWW-Authenticate": "Bearer"}

# The credentials as OpenAPI security schemes, so a generated client knows how to send them.
# They only describe: `bearer()` reads the headers (auto_error=False: they never refuse).
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key (`chat_...`), or an anonymous conversation's own token",
)
ACCESS_TOKEN = APIKeyHeader(
    name="ACCESS-TOKEN",
    auto_error=False,
    scheme_name="accessToken",
    description="An API key (seed-style clients)",
)
MASTER_BEARER = HTTPBearer(auto_error=False, scheme_name="masterBearer", description="MASTER_TOKEN")
MASTER_HEADER = APIKeyHeader(
    name="MASTER-TOKEN", auto_error=False, scheme_name="masterToken", description="MASTER_TOKEN"
)
# `openapi_extra` of a route where a credential is optional: FastAPI appends this `{}` (no
# credential at all) to the route's security alternatives.
OPTIONAL_CREDENTIAL: dict[str, Any] = {"security": [{}]}


@dataclass(frozen=True, slots=True)
class Caller:
    """What the request's credential opens: an account (`user`), or only the conversation
    whose token it is (`token`), or nothing."""

    user: User | None = None
    token: str | None = None


def bearer(request: Request, *headers: str) -> str | None:
    """`Authorization: Bearer <credential>`, else the first of `headers` that is set."""
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    for header in headers:
        if value := request.headers.get(header, "").strip():
            return value
    return None


async def get_caller(
    request: Request,
    services: ServicesDep,
    _bearer: Annotated[object, Security(BEARER)] = None,
    _access: Annotated[object, Security(ACCESS_TOKEN)] = None,
) -> Caller:
    """401 for a credential that opens nothing (an unknown or revoked key, a malformed one)."""
    credential = bearer(request, "access-token")
    if credential is None:
        return Caller()
    if credential.startswith(API_KEY_PREFIX):
        user = await services.accounts.by_key(credential)
        if user is not None:
            return Caller(user=user)
    elif is_uuid4(credential):
        return Caller(token=credential)
    raise HTTPException(401, detail=INVALID_CREDENTIALS, headers=CHALLENGE)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_user(caller: CallerDep) -> User:
    if caller.user is None:
        raise HTTPException(401, detail=KEY_REQUIRED, headers=CHALLENGE)
    return caller.user


UserDep = Annotated[User, Depends(get_user)]


def may_touch(caller: Caller, session: Session) -> bool:
    """Its owner's key; for an anonymous conversation, its own token."""
    if session.user_id is not None:
        return caller.user is not None and caller.user.user_id == session.user_id
    return caller.token is not None and hmac.compare_digest(caller.token, session.token)


async def conversation_for(caller: Caller, services: Services, conversation_id: str) -> Session:
    """The conversation (renewing its TTL, as reading a session does), or 404. Who may touch
    it is settled before the read that renews it, so a refused caller keeps nothing alive."""
    store = services.store
    if caller.user is not None:
        allowed = await store.owner(conversation_id) == caller.user.user_id
    else:  # an anonymous conversation's own token (an owned one needs its owner's key)
        allowed = (
            caller.token is not None
            and hmac.compare_digest(caller.token, conversation_id)
            and await store.owner(conversation_id) is None
        )
    session = await store.get(conversation_id) if allowed else None
    if session is None or not may_touch(caller, session):
        raise HTTPException(404, detail=CONVERSATION_MISSING)
    return session


async def require_master(
    request: Request,
    services: ServicesDep,
    _bearer: Annotated[object, Security(MASTER_BEARER)] = None,
    _header: Annotated[object, Security(MASTER_HEADER)] = None,
) -> None:
    """The admin routes: 404 when MASTER_TOKEN is unset (there are none), 401 without it."""
    master = services.settings.master_token
    if master is None:
        raise HTTPException(404, detail="Not Found")
    credential = bearer(request, "master-token") or ""
    if not hmac.compare_digest(credential.encode(), master.get_secret_value().encode()):
        raise HTTPException(401, detail=INVALID_CREDENTIALS, headers=CHALLENGE)
