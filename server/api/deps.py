"""The process-wide resources the lifespan creates, as one typed object for every route."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from core.accounts import AccountStore
from core.config import Settings
from core.keys import Keys
from core.redis import AnyRedis
from core.stats import StatsReader
from core.store import SessionStore
from server.hub import EventHub
from server.sockets import SocketRegistry


@dataclass(frozen=True, slots=True)
class Services:
    """Built once by the lifespan (server/main.py) and kept on `app.state.services`."""

    settings: Settings
    keys: Keys
    redis: AnyRedis
    store: SessionStore
    accounts: AccountStore
    hub: EventHub
    sockets: SocketRegistry
    stats: StatsReader


def get_services(conn: HTTPConnection) -> Services:
    services: Services = conn.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
