"""Liveness and readiness, and the tutorial's `/test`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from core.redis import eviction_warning, readiness_problem
from server.api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/test")
async def test() -> dict[str, str]:
    return {"msg": "API is Online"}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis is not usable; the reason"}})
async def readyz(services: ServicesDep) -> JSONResponse:
    """200 when Redis answers, JSON and Streams work and events reach the sockets; else 503
    with the reason. A Redis that could evict the service's keys is still ready, with
    `warnings` saying so (the server also logs it once at startup)."""
    if not services.hub.running:
        return JSONResponse(
            {"status": "unavailable", "detail": "event fan-out stopped (see the log)"},
            status_code=503,
        )
    problem = await readiness_problem(services.redis, services.keys)  # built in the lifespan
    if problem is not None:
        return JSONResponse({"status": "unavailable", "detail": problem}, status_code=503)
    warning = await eviction_warning(services.redis)
    if warning is not None:
        return JSONResponse({"status": "ready", "warnings": [warning]})
    return JSONResponse({"status": "ready"})
