"""The ceiling for the pipeline benchmark: a bare WebSocket echo on the server's own stack.

`python -m bench.echo_server --port P`: FastAPI under uvicorn with the same options as
`python -m server` (one process, same frame limit, no access log), and a `/echo` socket that
sends every text frame back. `GET /health` answers 200.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from core.heap import freeze_startup_heap
from server.__main__ import WS_MAX_FRAME_BYTES


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            return

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        "bench.echo_server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        ws_max_size=WS_MAX_FRAME_BYTES,
        log_config=None,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    freeze_startup_heap()  # as `python -m server` and `python -m worker` do
    main()
