"""The server-sent-events reader of the OpenAI-compatible backend, on byte streams cut at
every position (a network delivers an event in any number of blocks)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from worker.backends.openai_compat import sse_data

STREAM = (
    b": a comment the server sends to keep the connection open\n"
    b'data: {"a":1}\n\n'
    b"event: message\r\n"
    b'data:{"b":2}\r\n\r\n'
    b"data: first line\n"
    b"data: second line\n\n"
    b"id: 7\n\n"
    b"data: [DONE]"
)
EXPECTED = [b'{"a":1}', b'{"b":2}', b"first line\nsecond line", b"[DONE]"]


async def _blocks(data: bytes, cut: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), cut):
        yield data[start : start + cut]


async def _read(data: bytes, cut: int) -> list[bytes]:
    return [event async for event in sse_data(_blocks(data, cut))]


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 16, 1000])
async def test_events_are_read_whole_however_the_stream_is_cut(cut: int) -> None:
    assert await _read(STREAM, cut) == EXPECTED


async def test_an_empty_stream_has_no_events() -> None:
    assert await _read(b"", 1) == []
    assert await _read(b"\n\n: only a comment\n\n", 4) == []
