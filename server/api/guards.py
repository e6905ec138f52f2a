"""The checks in front of the endpoints: client address, rate limits and the socket's Origin."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from starlette.requests import HTTPConnection

from core.config import Settings
from server.api.deps import ServicesDep


def client_address(conn: HTTPConnection) -> str:
    """Whom the per-address limits count: the peer's address, or with FORWARDED_ALLOW_IPS the
    X-Forwarded-For address set by a trusted proxy (uvicorn's ProxyHeadersMiddleware, installed
    by create_app, rewrites it); an IPv6 client by its /64 (`address_group`)."""
    return address_group(conn.client.host if conn.client is not None else "unknown")


def address_group(host: str) -> str:
    """An IPv4 address as is; an IPv6 address as its /64 network, since one subscriber
    usually gets a whole /64 and could take a fresh address for every request; an
    IPv4-mapped IPv6 address as the IPv4 address. Anything else (a Unix socket, a test
    client's name) as is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address.packed, 64), strict=False))


def too_many_requests(wait: int) -> HTTPException:
    return HTTPException(
        429, detail=f"Too many requests: try again in {wait} s", headers={"Retry-After": str(wait)}
    )


def http_rate_limit(kind: str, limit: Callable[[Settings], int]) -> Callable[..., Awaitable[None]]:
    """A dependency counting one request of `kind` per client address: 429 over the limit."""

    async def check(request: Request, services: ServicesDep) -> None:
        settings = services.settings
        wait = await services.store.check_rate(
            kind,
            client_address(request),
            limit(settings),
            settings.rate_limit_http_window_seconds,
        )
        if wait:
            raise too_many_requests(wait)

    return check


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """No Origin (scripts, Postman), the server's own origin (same host:port as the request),
    or a listed origin; `*` in the list allows every origin."""
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    listed = {entry.strip().rstrip("/").lower() for entry in allowed}
    if "*" in listed or origin in listed:
        return True
    netloc = urlsplit(origin).netloc
    return bool(netloc) and host is not None and netloc == host.strip().lower()
