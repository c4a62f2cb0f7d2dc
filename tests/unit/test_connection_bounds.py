"""What one client can make a ``ClientConnection`` hold, over real loopback TCP.

Pongs count against the send buffer (cut off with 1008, then reset); a message
is capped in fragments (1009) as well as bytes, and a half-sent frame only up
to the byte cap; close and abort after the connection is gone do nothing; a
refusal the client does not read is reset after the close timeout; a client's
events waiting for a worker count for its flood limit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

import gateway.connection as connection
import gateway.handshake as handshake
from businessworker.testing import TIMEOUT
from gateway import protocol as p
from gateway.connection import READ_SLICE, ClientConnection, text_frame
from gateway.handshake import Refused
from gateway.workers import WorkerPool
from tests.unit.test_connection_writes import (
    LOOPS,
    UPGRADE,
    FakeGateway,
    Watched,
    read_exactly,
    run,
    socket_pair,
    turn,
    until,
)

PING = Frame(Opcode.PING, b"p" * 125).serialize(mask=True)


def client_frame(opcode: Opcode, data: bytes = b"", *, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


async def connect(gw: Any, **bufs: int) -> tuple[Watched, socket.socket]:
    """A connection before its opening handshake, and the client's socket."""
    accepted, client = socket_pair(**bufs)
    conn = Watched(gw)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, accepted)
    return conn, client


async def open_watched(gw: Any, **bufs: int) -> tuple[Watched, socket.socket]:
    """A connection past its opening handshake, and the client's socket."""
    loop = asyncio.get_running_loop()
    conn, client = await connect(gw, **bufs)
    await loop.sock_sendall(client, UPGRADE)
    response = b""
    while b"\r\n\r\n" not in response:
        response += await loop.sock_recv(client, 4096)
    assert response.startswith(b"HTTP/1.1 101") and conn.writable
    return conn, client


async def read_close(client: socket.socket) -> tuple[int, str]:
    """Skip the server frames before its close frame; return the close code and reason."""
    while True:
        head = await read_exactly(client, 2)
        length = head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await read_exactly(client, 2))
        body = await read_exactly(client, length)
        if head[0] & 0x0F == 0x8:
            return struct.unpack("!H", body[:2])[0], body[2:].decode()


async def reset_seen(client: socket.socket) -> bool:
    """Whether the client's socket got a reset (after what it had received)."""
    try:
        while client.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    return False


class Recording(FakeGateway):
    """Keeps the messages handed on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.messages: list[str | bytes] = []

    def received(self, conn: ClientConnection, message: str | bytes) -> None:
        self.messages.append(message)


# The protocol's own frames count against the send buffer


@pytest.mark.parametrize("after_close", [False, True], ids=["open", "closing"])
@pytest.mark.parametrize("loop", LOOPS)
def test_pongs_count_against_the_send_buffer_and_cut_off_with_1008(
    loop: str, after_close: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that pings and never reads is cut off once, then reset; later input is not read.

    ``closing``: the same while our closing handshake waits for its answer.
    """
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 0.2)
    limit = 64 << 10

    async def test() -> None:
        loop_ = asyncio.get_running_loop()
        gw = FakeGateway(max_send_buffer=limit)
        conn, client = await open_watched(gw, sndbuf=4096, rcvbuf=4096)
        if after_close:
            conn.close(1000, "bye")
        batch = PING * 100
        async with asyncio.timeout(TIMEOUT):  # about 700 pings are enough
            while not gw.cut.is_set():
                await loop_.sock_sendall(client, batch)
                await turn(1)
        assert gw.stats_slow_closed == 1
        transport = conn.transport
        assert transport.is_closing() and not transport.is_reading()
        assert conn.ws.close_sent.code == (1000 if after_close else 1008)
        buffered = transport.get_write_buffer_size()
        # over the limit by at most one slice's pongs (a pong is smaller than its ping)
        assert limit < buffered <= limit + READ_SLICE + 64
        # What it sends now is not read, and the parser would discard it anyway.
        for _ in range(100):
            try:
                client.send(batch)
            except BlockingIOError:
                break
        await turn()
        assert transport.get_write_buffer_size() <= buffered
        conn.ws.receive_data(PING)
        assert conn.ws.data_to_send() == [] and conn.ws.events_received() == []
        await asyncio.wait_for(conn.lost.wait(), 5)  # the reset after CLOSE_TIMEOUT
        assert gw.closed_conns == [conn]
        assert await reset_seen(client)
        client.close()

    run(loop, test)
    assert caplog.text.count("client too slow") == 1


# A message is capped in fragments as well as bytes


@pytest.mark.parametrize("loop", LOOPS)
def test_a_message_is_capped_in_fragments_empty_ones_included(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.connection")

    async def test() -> None:
        loop_ = asyncio.get_running_loop()
        gw = Recording()
        cap = gw.max_fragments
        assert cap == 1024  # GatewayConfig's default, as FakeGateway has it
        conn, client = await open_watched(gw)
        empty = client_frame(Opcode.CONT, fin=False)
        at_cap = (  # exactly `cap` frames: allowed
            client_frame(Opcode.TEXT, b"a", fin=False)
            + empty * (cap - 2)
            + client_frame(Opcode.CONT, b"b")
        )
        # `cap` + 2 frames, a valid message but for the cap: never handed on
        over = (
            client_frame(Opcode.TEXT, b"c", fin=False)
            + empty * cap
            + client_frame(Opcode.CONT, b"d")
        )
        await loop_.sock_sendall(client, at_cap + over)
        assert await read_close(client) == (1009, f"message over {cap} fragments")
        assert gw.messages == ["ab"]
        assert conn._fragments is None
        assert await loop_.sock_recv(client, 10) == b""  # then the end of stream
        await asyncio.wait_for(conn.lost.wait(), 5)
        client.close()

    run(loop, test)
    assert "too many fragments, closing client=1 fragments=1025" in caplog.text


@pytest.mark.parametrize("loop", LOOPS)
def test_a_half_sent_frame_is_held_only_up_to_the_message_size(loop: str) -> None:
    """websockets' parser refuses a frame over ``max_size`` from its header alone."""

    async def test() -> None:
        loop_ = asyncio.get_running_loop()
        gw = Recording()
        gw.max_message_size = 64 << 10
        conn, client = await open_watched(gw)
        frame = client_frame(Opcode.BINARY, b"x" * (64 << 10))  # the cap itself
        await loop_.sock_sendall(client, frame[: len(frame) // 2])
        header = len(frame) - (64 << 10)
        # all of it read, and the header parsed off: the payload waits in the buffer
        await until(lambda: len(conn.ws.reader.buffer) == len(frame) // 2 - header)
        assert len(conn.ws.reader.buffer) <= gw.max_message_size
        await loop_.sock_sendall(client, frame[len(frame) // 2 :])
        await until(lambda: gw.messages)
        assert gw.messages == [b"x" * (64 << 10)] and len(conn.ws.reader.buffer) == 0
        # One byte more, announced in a header: refused before any payload arrives.
        await loop_.sock_sendall(client, client_frame(Opcode.BINARY, b"y" * (64 << 10 | 1))[:14])
        assert (await read_close(client))[0] == 1009
        assert len(conn.ws.reader.buffer) == 0
        client.close()

    run(loop, test)


# Closing a connection that is already gone


@pytest.mark.parametrize("how", ["answered", "reset"])
@pytest.mark.parametrize("loop", LOOPS)
def test_close_and_abort_after_the_connection_is_lost_do_nothing(
    loop: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``answered``: we close, the client answers, the close timer must not fire.

    ``reset``: the client resets before a close command arrives for it (the
    socket is gone while the WebSocket is still OPEN). Either way nothing is
    logged: uvloop's socket object of a lost connection says fd -1, and a
    setsockopt on it raised ValueError in the abort the close timer ran.
    """

    async def test() -> None:
        gw = FakeGateway()
        conn, client = await open_watched(gw)
        timer = None
        if how == "answered":
            conn.close(1000, "bye")
            timer = conn._close_timer
            assert timer is not None
            assert await read_close(client) == (1000, "bye")
        else:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        await asyncio.wait_for(conn.lost.wait(), 5)
        assert conn.transport is None and conn._close_timer is None
        if timer is not None:
            assert timer.cancelled()
        conn.close(1000)
        conn.write(text_frame("late"))
        conn.write_direct(text_frame("late"))
        conn.pause()
        conn.resume()
        conn.abort()  # what a close timer left pending would have run
        assert conn._close_timer is None
        await turn()

    run(loop, test)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("loop", LOOPS)
def test_a_close_during_the_opening_handshake_ends_it(loop: str) -> None:
    async def test() -> None:
        conn, client = await connect(FakeGateway())
        await asyncio.get_running_loop().sock_sendall(client, UPGRADE[:20])
        conn.close(1012)
        assert conn._handshake is None
        await asyncio.wait_for(conn.lost.wait(), 5)
        assert conn._handshake_timer is None and conn.ws is None
        client.close()

    run(loop, test)


# A refusal the client does not read


def padded(real: Any) -> Any:
    """``refuse`` with 4 MiB more body: a response the kernel cannot take at once.

    A real refusal is about 200 bytes; what holds one in practice is a client
    whose TCP window is shut. Here the size does it.
    """

    def refuse(status: int, reason: str) -> Refused:
        refused = real(status, reason)
        return Refused(refused.status, refused.response + b"x" * (4 << 20), refused.reason)

    return refuse


@pytest.mark.parametrize("kind", ["refused", "timed out"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_refusal_the_client_does_not_read_is_reset_after_the_close_timeout(
    loop: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 0.2)
    monkeypatch.setattr(connection, "HANDSHAKE_TIMEOUT", 0.2)
    monkeypatch.setattr(connection, "refuse", padded(connection.refuse))
    monkeypatch.setattr(handshake, "refuse", padded(handshake.refuse))

    async def test() -> None:
        loop_ = asyncio.get_running_loop()
        conn, client = await connect(FakeGateway(), sndbuf=4096, rcvbuf=4096)
        request = b"POST / HTTP/1.1\r\n" if kind == "refused" else UPGRADE[:20]
        await loop_.sock_sendall(client, request)
        await until(lambda: conn._handshake is None, 0.001)  # the gateway has answered
        assert conn.transport.is_closing() and conn.transport.get_write_buffer_size() > 0
        assert conn._close_timer is not None  # it would have waited forever
        await asyncio.wait_for(conn.lost.wait(), 5)
        assert await reset_seen(client)
        client.close()

    run(loop, test)


# A client's events waiting for a worker


class FakeSocket:
    """What a ROUTER socket would send: every frame, decoded."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[Any]]] = []

    def send_multipart(self, parts: list[bytes], flags: int = 0) -> None:
        route, *frames = parts
        self.sent.extend((route, p.unpack(frame)) for frame in frames)


class PoolGateway(FakeGateway):
    """Hands the connection's events to a real ``WorkerPool``, as ``Gateway`` does."""

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool
        self.most = 0
        """the most events of one client ever held at once (pending + queued)"""

    def opened(self, conn: ClientConnection, path: str, headers: Any) -> None:
        conn.client_id = 1
        self._event(conn, p.EVENT_CONNECT, [path, "", headers, ""])

    def received(self, conn: ClientConnection, message: str | bytes) -> None:
        self._event(conn, p.EVENT_MESSAGE, message)

    def closed(self, conn: ClientConnection) -> None:
        super().closed(conn)
        self._event(conn, p.EVENT_CLOSE)

    def _event(self, conn: ClientConnection, opcode: int, payload: Any = None) -> None:
        self.pool.event(conn, opcode, payload)
        self.most = max(self.most, conn.route.pending + conn.route.queued)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_clients_waiting_events_are_bounded_while_no_worker_is_linked(loop: str) -> None:
    """20,000 says sent flat out with no worker: the client is paused near its flood
    limit, the waiting queue holds no more, and once a worker links every say
    arrives, in order."""
    count = 20_000

    async def test() -> None:
        loop_ = asyncio.get_running_loop()
        sock = FakeSocket()
        pool = WorkerPool(
            sock,  # type: ignore[arg-type]
            max_waiting=10_000,
            flood_limit=100,
            call_soon=lambda flush: flush(),
        )
        gw = PoolGateway(pool)
        conn, client = await open_watched(gw)
        data = b"".join(client_frame(Opcode.TEXT, b"%d" % i) for i in range(count))
        sender = asyncio.create_task(loop_.sock_sendall(client, data))
        await until(lambda: conn._unread is not None, 0.001)  # paused by the pool
        # The slice that reached the limit was parsed to its end, no further.
        bound = pool.flood_limit + READ_SLICE // len(client_frame(Opcode.TEXT, b"0")) + 1
        assert len(pool.waiting) == conn.route.queued <= bound
        await turn()
        assert len(pool.waiting) == conn.route.queued <= bound and conn.open

        pool.hello(b"w1", {})
        says: list[str] = []
        async with asyncio.timeout(TIMEOUT):  # a worker acknowledging what it gets
            while len(says) < count:
                events = [m for _, m in sock.sent if m[0] == p.EVENT_MESSAGE]
                says.extend(m[5] for m in events)
                seqs = [m[1] for _, m in sock.sent if m[0] in (p.EVENT_CONNECT, p.EVENT_MESSAGE)]
                sock.sent.clear()
                pool.ack(b"w1", seqs)  # may resume the client: its unread bytes come first
                await asyncio.sleep(0.0005 if not seqs else 0)
        assert says == [str(i) for i in range(count)]
        assert gw.most <= bound and pool.refused == 0
        await asyncio.wait_for(sender, 5)
        assert conn._unread is None and conn.route.pending == conn.route.queued == 0
        client.close()
        await asyncio.wait_for(conn.lost.wait(), 5)

    run(loop, test)
