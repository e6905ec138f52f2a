"""The failure answers of the API v1 routes, declared once for the OpenAPI schema: every
status a route can give, with its body model and headers, so a generated client is right."""

from __future__ import annotations

from typing import Any

from core.models import MAX_TITLE_CHARS, ErrorBody, FieldErrorBody
from server.api.auth import CONVERSATION_MISSING, INVALID_CREDENTIALS

Answer = dict[str, Any]

UNAUTHORIZED: Answer = {
    "model": ErrorBody,
    "description": f"No API key where one is needed, or a credential that opens nothing "
    f"(an unknown or revoked key): {INVALID_CREDENTIALS}",
    "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
}
MISSING: Answer = {
    "model": ErrorBody,
    "description": f"{CONVERSATION_MISSING}: it does not exist, has expired, or this "
    "credential may not touch it (never 403, so ids cannot be probed)",
}
# FastAPI answers 400 "There was an error parsing the body" for a body it cannot read.
BAD_NAME: Answer = {
    "model": FieldErrorBody | ErrorBody,
    "description": "Blank, over-long or unusable name (the rules of `POST /token`)",
}
BAD_TITLE: Answer = {
    "model": FieldErrorBody | ErrorBody,
    "description": f"Blank title, over {MAX_TITLE_CHARS} characters, or control characters",
}
BAD_CURSOR: Answer = {"model": ErrorBody, "description": "Not a `next_cursor` this API wrote"}
RATE_LIMITED: Answer = {
    "model": ErrorBody,
    "description": "Too many requests from this address",
    "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
}
NO_CONTENT: Answer = {"description": "Done; no body"}
