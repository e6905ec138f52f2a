"""A WebSocket client on a bare TCP socket, for hostile-client tests: it does the handshake,
sends frames, and reads only when told to, so it can stop reading for good.

The websockets library always reads in the background (it buffers frames until its queue is
full), so it cannot play a client whose TCP receive window stays shut; this one can, with a
small `SO_RCVBUF` so that the kernel holds little on the client's side.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from urllib.parse import urlsplit


class RawSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, ws_url: str, *, receive_buffer: int = 4096) -> RawSocket:
        """Open the socket and complete the handshake (raises if it is refused)."""
        parts = urlsplit(ws_url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect, so the window the client advertises stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            sock.close()
            raise ConnectionRefusedError(status.decode(errors="replace"))
        return cls(sock)

    async def send_text(self, text: str) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, frame(0x1, text.encode()))

    async def read_until_closed(self, timeout: float) -> bytes:
        """Read everything until the server closes or resets the connection; what was read.
        Raises TimeoutError if it is still open after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        received = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await loop.sock_recv(self.sock, 65536)
                except ConnectionResetError:
                    return bytes(received)
                if not chunk:
                    return bytes(received)
                received += chunk

    def close(self) -> None:
        self.sock.close()


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return header + mask + _mask(payload, mask)


def _mask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the mask, fast for big payloads (int arithmetic instead of a byte loop)."""
    if not payload:
        return b""
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(payload), "big")


def close_codes(data: bytes) -> list[int]:
    """The close codes of the close frames among unmasked server frames in `data` (a stream
    read from the start of the connection, after the handshake)."""
    codes = []
    position = 0
    while position + 2 <= len(data):
        opcode, length = data[position] & 0x0F, data[position + 1] & 0x7F
        position += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[position : position + 2])
            position += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[position : position + 8])
            position += 8
        payload = data[position : position + length]
        position += length
        if opcode == 0x8 and len(payload) >= 2:
            codes.append(struct.unpack("!H", payload[:2])[0])
    return codes
