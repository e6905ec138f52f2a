"""GET /metrics: the Prometheus text exposition (docs/metrics.md).

Mounted on the public port only when SERVER_METRICS_PORT is 0 (`server/main.py`); otherwise
`python -m server` serves the same registry on its own loopback port.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from core.metrics import CONTENT_TYPE, render

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Rendered in a thread: the queue gauges are read from Redis with a blocking client, and
    the multi-process mode reads every process's files; neither may stall the chat sockets."""
    body = await asyncio.to_thread(render, request.app.state.metrics_registry)
    return Response(content=body, media_type=CONTENT_TYPE)
