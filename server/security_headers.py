"""Security headers on every HTTP answer: the page's Content-Security-Policy and friends.

The chat page renders text written by a model (and, through it, by whoever steers the
prompt). The renderer never sets HTML, but the policy is the second line: should anything
slip through, the browser still runs only the page's own scripts, loads no remote images
(a fetched image URL tells its host who reads the chat), connects only to this server and
cannot be framed. The session token travels in URLs, so no Referer header ever carries it.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware): it only edits the headers of
`http.response.start`, so streamed and static responses pass through untouched, and
WebSocket handshakes are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# What the built page (client/dist) and the basic page need, and nothing more: scripts and
# styles are files from this origin (no inline code, no eval), images only from here or data:
# URLs (the favicon), sockets and fetches only to this origin ('self' covers ws:/wss: to the
# same host and port in CSP Level 3 browsers).
PAGE_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    )
)

# FastAPI's interactive API docs load Swagger UI / ReDoc from a CDN and start them with an
# inline script; they get a policy that allows exactly that, and still cannot be framed.
DOCS_CDN = "https://cdn.jsdelivr.net"
DOCS_POLICY = "; ".join(
    (
        "default-src 'self'",
        f"script-src 'self' 'unsafe-inline' {DOCS_CDN}",
        f"style-src 'self' 'unsafe-inline' {DOCS_CDN} https://fonts.googleapis.com",
        "font-src 'self' https://fonts.gstatic.com",
        "img-src 'self' data: https://fastapi.tiangolo.com",
        f"connect-src 'self' {DOCS_CDN}",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    )
)
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")


def security_headers(policy: str) -> dict[str, str]:
    """The headers every answer carries, with the given Content-Security-Policy."""
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        # The token is in URLs (`/chat?token=`, `/refresh_token?token=`): never send a Referer.
        "Referrer-Policy": "no-referrer",
    }


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response (a route's own values win)."""

    def __init__(self, app: ASGIApp, docs_paths: Iterable[str] = DOCS_PATHS) -> None:
        self.app = app
        self.docs_paths = frozenset(docs_paths)
        self.page_headers = security_headers(PAGE_POLICY)
        self.docs_headers = security_headers(DOCS_POLICY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = self.docs_headers if scope["path"] in self.docs_paths else self.page_headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in wanted.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
