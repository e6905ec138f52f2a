"""The answer every route gives while Redis is unreachable: a 503 the client can retry."""

from __future__ import annotations

from fastapi import status
from fastapi.responses import JSONResponse

REDIS_UNAVAILABLE = "The service is briefly unavailable; try again in a moment."


def unavailable_response() -> JSONResponse:
    return JSONResponse(
        {"detail": REDIS_UNAVAILABLE},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )
