"""The chat page's static files at `/`, which must not answer for the API's own paths.

A Mount at `/` matches every path, so without this a method an API path does not have
(`OPTIONS /token`) reached StaticFiles, which answered `405 Allow: GET, HEAD`: the page's
methods, not the API's. Here such a request gets the API's 405, with an `Allow` listing every
method the API has for that path (the union of its routes: FastAPI's own 405 names only the
first route's).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse
from starlette.routing import Mount, compile_path
from starlette.types import ASGIApp, Receive, Scope, Send


class ClientFiles(Mount):
    """`Mount("/", StaticFiles(...))` that leaves the API's paths to the API: the paths of the
    app's OpenAPI schema (what a client, and schemathesis, knows of), with its methods."""

    def __init__(self, app: ASGIApp, name: str = "client") -> None:
        super().__init__("/", app=app, name=name)
        self._api_paths: list[tuple[re.Pattern[str], set[str]]] | None = None

    def api_methods(self, scope: Scope) -> set[str]:
        """The methods the API has for this request's path (empty: not an API path)."""
        if self._api_paths is None:
            schema: dict[str, Any] = scope["app"].openapi()
            self._api_paths = [
                (compile_path(path)[0], {method.upper() for method in operations})
                for path, operations in schema.get("paths", {}).items()
            ]
        path: str = scope["path"]
        return {m for pattern, methods in self._api_paths if pattern.match(path) for m in methods}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            methods = self.api_methods(scope)
            if methods:  # an API path, and not one of its methods (those matched before)
                response = JSONResponse(
                    {"detail": "Method Not Allowed"},
                    status_code=405,
                    headers={"Allow": ", ".join(sorted(methods))},
                )
                await response(scope, receive, send)
                return
        await super().handle(scope, receive, send)
