"""Dependencies: the process-wide resources the lifespan created, for HTTP and WebSocket routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from core.config import Settings
from core.store import SessionStore
from server.hub import EventHub
from server.sockets import SocketRegistry


def get_settings(conn: HTTPConnection) -> Settings:
    settings: Settings = conn.app.state.settings
    return settings


def get_redis(conn: HTTPConnection) -> Redis:
    redis: Redis = conn.app.state.redis
    return redis


def get_store(conn: HTTPConnection) -> SessionStore:
    store: SessionStore = conn.app.state.store
    return store


def get_hub(conn: HTTPConnection) -> EventHub:
    hub: EventHub = conn.app.state.hub
    return hub


def get_sockets(conn: HTTPConnection) -> SocketRegistry:
    sockets: SocketRegistry = conn.app.state.sockets
    return sockets


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
StoreDep = Annotated[SessionStore, Depends(get_store)]
HubDep = Annotated[EventHub, Depends(get_hub)]
SocketsDep = Annotated[SocketRegistry, Depends(get_sockets)]
