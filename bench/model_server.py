"""A minimal OpenAI-compatible model server that answers at once (or after a fixed delay).

`python -m bench.model_server --port P [--delay 0.2] [--pieces 3]`

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) on plain asyncio so that
the benchmark measures the chat pipeline, not the model server: `POST .../chat/completions`
with `"stream": true` gets `--pieces` word chunks and `data: [DONE]` in one write, after
`--delay` seconds; `GET /health` answers 200. It binds to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from collections.abc import Sequence

from core.heap import freeze_startup_heap

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
WORDS = ("bench", "reply", "from", "the", "instant", "model", "server", "done")


def completion_body(pieces: int) -> bytes:
    """The SSE stream of one chat completion: a role chunk, `pieces` content chunks, a stop."""

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        payload = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "bench",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""})]
    for i in range(pieces):
        word = WORDS[i % len(WORDS)]
        parts.append(chunk({"content": word if i == 0 else f" {word}"}))
    parts.append(chunk({}, "stop"))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


class InstantModel:
    def __init__(self, delay: float, pieces: int) -> None:
        self.delay = delay
        self.completion = response("200 OK", "text/event-stream", completion_body(pieces))
        self.health = response("200 OK", "application/json", b'{"status":"ok"}')
        self.not_found = response("404 Not Found", "application/json", b'{"error":"not found"}')

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _version = request_line.split(" ", 2)
                length = 0
                for line in header_lines:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length > MAX_BODY_BYTES:
                    return
                if length:
                    await reader.readexactly(length)
                if method == "POST" and path.endswith("/chat/completions"):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    writer.write(self.completion)
                elif method == "GET" and path == "/health":
                    writer.write(self.health)
                else:
                    writer.write(self.not_found)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def serve(port: int, delay: float, pieces: int) -> None:
    model = InstantModel(delay, pieces)
    server = await asyncio.start_server(
        model.handle, "127.0.0.1", port, limit=MAX_HEADER_BYTES, backlog=1024
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--pieces", type=int, default=3, help="content chunks per answer")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.delay, args.pieces))


if __name__ == "__main__":
    freeze_startup_heap()  # as `python -m server` and `python -m worker` do
    main()
