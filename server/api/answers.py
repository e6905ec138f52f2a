"""The failure answers of the API v1 routes, declared once for the OpenAPI schema: every
status a route can give, with its body model and headers, so a generated client is right.
(The answers every route shares, RATE_LIMITED and UNAVAILABLE, are server/api/schema.py's.)"""

from __future__ import annotations

from typing import Any

from core.models import MAX_TITLE_CHARS
from server.api.auth import CONVERSATION_MISSING, INVALID_CREDENTIALS
from server.api.schema import Detail, NameRefused, answer

UNAUTHORIZED: Any = {
    "model": Detail,
    "description": f"No API key where one is needed, or a credential that opens nothing "
    f"(an unknown or revoked key): {INVALID_CREDENTIALS}",
    "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
}
MISSING = answer(
    Detail,
    f"{CONVERSATION_MISSING}: it does not exist, has expired, or this credential may not "
    "touch it (never 403, so ids cannot be probed)",
)
# FastAPI answers 400 "There was an error parsing the body" for a body it cannot read.
BAD_NAME: Any = {
    "model": NameRefused | Detail,
    "description": "Blank, over-long or unusable name (the rules of `POST /token`)",
}
BAD_TITLE: Any = {
    "model": NameRefused | Detail,
    "description": f"Blank title, over {MAX_TITLE_CHARS} characters, or control characters",
}
BAD_CURSOR = answer(Detail, "Not a `next_cursor` this API wrote")
NO_CONTENT: Any = {"description": "Done; no body"}
