"""Liveness and readiness, `/health` (API v1), and the tutorial's `/test`."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from core.redis import eviction_warning, readiness_problem, topology
from server.api.deps import Services, ServicesDep

router = APIRouter(tags=["health"])

PACKAGE = "redis-chat"


def package_version() -> str:
    """The installed package's version (pyproject.toml), "unknown" when run from a tree that
    was never installed."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


class RedisTopology(BaseModel):
    mode: str  # "single" or "cluster"
    partitions: int
    masters: int | None = None  # a cluster's masters that serve slots
    state: str | None = None  # a cluster's state ("ok" or "fail")


class Readiness(BaseModel):
    status: str
    detail: str | None = None
    redis: RedisTopology | None = None
    warnings: list[str] | None = None


class Health(BaseModel):
    status: str
    version: str
    detail: str | None = None


async def readiness(services: Services) -> str | None:
    """None when the process can serve: events reach the sockets, Redis answers and JSON and
    Streams work; else what is wrong, in words."""
    if not services.hub.running:
        return "event fan-out stopped (see the log)"
    return await readiness_problem(services.redis, services.keys)  # built in the lifespan


@router.get("/test")
async def test() -> dict[str, str]:
    return {"msg": "API is Online"}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"model": Readiness, "description": "Not ready; `detail` says why"}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    """200 when Redis answers, JSON and Streams work and events reach the sockets; else 503
    with the reason. A Redis that could evict the service's keys is still ready, with
    `warnings` saying so (the server also logs it once at startup)."""
    problem = await readiness(services)
    if problem is not None:
        return JSONResponse({"status": "unavailable", "detail": problem}, status_code=503)
    body: dict[str, Any] = {
        "status": "ready",
        "redis": await topology(services.redis, services.keys),
    }
    warning = await eviction_warning(services.redis)
    if warning is not None:
        body["warnings"] = [warning]
    return JSONResponse(body)


@router.get(
    "/health",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": Health, "description": "Not ready (as /readyz); `detail` says why"}},
)
async def health(services: ServicesDep) -> JSONResponse:
    """`{"status": "healthy", "version"}` when ready, by the checks of /readyz; 503
    `{"status": "unhealthy", "version", "detail"}` otherwise."""
    problem = await readiness(services)
    if problem is not None:
        body = {"status": "unhealthy", "version": package_version(), "detail": problem}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "healthy", "version": package_version()})
