"""The ASGI application: `create_app()` is the factory uvicorn runs (`--factory`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from redis.exceptions import RedisError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from core.accounts import AccountStore
from core.config import Settings, get_settings
from core.keys import Keys
from core.logs import configure_logging
from core.metrics import QueueCollector, serving_registry
from core.redis import connect_redis, ensure_group, eviction_warning
from core.stats import StatsReader
from core.store import SessionStore
from server.api.deps import Services
from server.api.errors import unavailable_response
from server.api.main import api_router
from server.api.routes import metrics
from server.client_files import ClientFiles
from server.hub import EventHub
from server.security_headers import SecurityHeadersMiddleware
from server.sockets import SocketRegistry

logger = logging.getLogger(__name__)

GZIP_MINIMUM_BYTES = 4096


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the process's services once, for every route (`app.state.services`)."""
    settings: Settings = app.state.settings
    redis = await connect_redis(settings)
    keys = Keys.from_settings(settings)
    hub = EventHub(redis, keys, settings.outbox_max_bytes)
    sockets = SocketRegistry(
        redis,
        keys,
        settings.max_sockets_per_session,
        settings.socket_lease_seconds,
        settings.max_sockets_per_address,
    )
    try:
        await ensure_group(redis, keys)
        await hub.start()
        await sockets.start()
        app.state.services = Services(
            settings=settings,
            keys=keys,
            redis=redis,
            store=SessionStore(redis, settings, keys=keys),
            accounts=AccountStore(redis, keys),
            hub=hub,
            sockets=sockets,
            stats=StatsReader(redis, keys, settings.worker_lease_seconds),
        )
        if (warning := await eviction_warning(redis)) is not None:
            logger.warning("%s", warning)
        logger.info("server ready (redis %s)", settings.redis_url.rsplit("@", 1)[-1])
        yield
    finally:
        if app.state.metrics_queue is not None:
            app.state.metrics_queue.close()
        await sockets.aclose()
        await hub.aclose()
        await redis.aclose()


async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """An HTTP request that needed Redis while it was unreachable (the client retries)."""
    logger.warning("%s %s: Redis unavailable (%s)", request.method, request.url.path, exc)
    return unavailable_response()


def mount_metrics(app: FastAPI, settings: Settings) -> None:
    """The registry a scrape renders (`app.state.metrics_registry`, also served on
    SERVER_METRICS_PORT by `python -m server`), and /metrics on this port when that is 0."""
    app.state.metrics_queue = None
    app.state.metrics_registry = None
    if not settings.metrics_enabled:
        return
    app.state.metrics_queue = QueueCollector(settings)
    app.state.metrics_registry = serving_registry(app.state.metrics_queue)
    if settings.server_metrics_port == 0:
        app.include_router(metrics.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="Redis chat service",
        summary="Chat sessions over a WebSocket, answered by model workers through Redis.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["*"],
        )
    if settings.forwarded_allow_ips:
        # The client address (rate limits, logs) comes from X-Forwarded-For only when the
        # request comes from one of these proxies; anyone else's header is ignored.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)
    app.add_middleware(SecurityHeadersMiddleware)  # CSP, nosniff, no Referer: security_headers.py
    # Large answers (a long /refresh_token history) go compressed to clients that accept it.
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MINIMUM_BYTES)
    app.include_router(api_router)
    mount_metrics(app, settings)
    app.add_exception_handler(RedisError, redis_unavailable)
    client_dir = settings.resolved_client_dir
    if client_dir.is_dir():
        files = StaticFiles(directory=client_dir, html=True)
        app.router.routes.append(ClientFiles(files))
    else:
        logger.warning("no client page at %s; serving the API only", client_dir)
    return app
