"""A lean WebSocket client for load generation: raw asyncio Protocol, hand-made upgrade.

Server frames are unmasked, so parsing is a few byte lookups per frame; client
frames are masked (RFC 6455) with a random key per frame. No task per
connection, no extension negotiation, no UTF-8 validation: the load process
looks only at the fields it needs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
from collections.abc import Callable
from typing import Any

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = base64.b64encode(b"chatcluster-benc")  # 16 bytes; the server does not care which
ACCEPT = base64.b64encode(hashlib.sha1(KEY + GUID).digest())

OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10


def upgrade_request(host: str, port: int, path: str = "/") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n:
        key = (mask * ((n + 3) // 4))[:n]
        payload = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little"
        )
    return header + mask + payload


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One unmasked frame, as the server writes it (used by the floor)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return header + payload


CLOSE_1000 = client_frame(b"\x03\xe8", OP_CLOSE)


def make_socket(source: str | None, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking TCP socket bound to a loopback source address (port chosen at connect)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
    sock.setblocking(False)
    return sock


class WS(asyncio.Protocol):
    """One client connection. ``on_text(conn, payload)`` gets every text message."""

    __slots__ = (
        "buf",
        "close_code",
        "close_sent",
        "closed",
        "counts",
        "ctr",
        "data",
        "idx",
        "lost",
        "name",
        "on_text",
        "opened",
        "request",
        "roster",
        "t_done",
        "transport",
        "uid",
    )

    def __init__(
        self, idx: int, request: bytes, on_text: Callable[[WS, bytes], None], opened: Any
    ) -> None:
        self.idx = idx
        self.request = request
        self.on_text = on_text
        self.opened: asyncio.Future[bool] | None = opened
        self.transport: asyncio.Transport | None = None
        self.buf: bytes | None = b""  # None once the upgrade is done
        self.close_code: int | None = None
        self.close_sent = False
        self.closed: asyncio.Future[None] | None = None
        self.lost = False
        self.uid = 0
        self.counts: bytearray | None = None
        self.roster: Any = None
        self.data: bytes | None = None
        """an incomplete frame carried over to the next read"""
        self.name = ""
        self.t_done = 0
        self.ctr = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(False)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if buf is None:
            self._frames(data)
            return
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        ok = buf.startswith(b"HTTP/1.1 101") and ACCEPT in buf[:end]
        self.buf = None
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(ok)
        if not ok:
            self.transport.close()
            return
        rest = buf[end + 4 :]
        if rest:
            self._frames(rest)

    # Frames

    def _frames(self, data: bytes) -> None:
        pending = self.data
        if pending:
            data = pending + data
            self.data = None
        n = len(data)
        pos = 0
        on_text = self.on_text
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            opcode = data[pos] & 0x0F
            if opcode == OP_TEXT:
                on_text(self, data[start:end])
            elif opcode == OP_CLOSE:
                self._closed_by_server(data[start:end])
                return
            elif opcode == OP_PING:
                self.transport.write(client_frame(data[start:end], OP_PONG))
            pos = end
        if pos < n:
            self.data = data[pos:]

    def _closed_by_server(self, payload: bytes) -> None:
        self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        if not self.transport.is_closing():
            if not self.close_sent:  # the server began: echo its close (RFC 6455 5.5.1)
                self.transport.write(client_frame(payload[:2], OP_CLOSE))
            self.transport.close()

    # Sending

    def send_text(self, payload: bytes) -> None:
        self.transport.write(client_frame(payload))

    def close(self) -> None:
        """Start the closing handshake; the server closes TCP after its answer."""
        t = self.transport
        if t is not None and not t.is_closing():
            if self.buf is None:
                t.write(CLOSE_1000)
                self.close_sent = True
            else:
                t.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_ws(
    loop: asyncio.AbstractEventLoop,
    idx: int,
    host: str,
    port: int,
    source: str | None,
    on_text: Callable[[WS, bytes], None],
    *,
    rcvbuf: int | None = None,
    timeout: float | None = 30.0,
) -> WS:
    """Connect, upgrade; return the open connection (raises on failure).

    ``timeout=None`` waits without a timer of its own (the caller bounds the
    time): the handshake benchmark's client then costs less per connection.
    """
    opened: asyncio.Future[bool] = loop.create_future()
    conn = WS(idx, upgrade_request(host, port), on_text, opened)
    sock = make_socket(source, rcvbuf)
    try:
        if timeout is None:
            await loop.sock_connect(sock, (host, port))
        else:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        await loop.create_connection(lambda: conn, sock=sock)
    except BaseException:
        sock.close()
        raise
    ok = await (opened if timeout is None else asyncio.wait_for(opened, timeout))
    conn.opened = None
    if not ok:
        conn.abort()
        raise ConnectionError(f"upgrade refused or connection lost ({host}:{port})")
    return conn
