"""The fan-out path of ``ClientConnection`` over real loopback TCP, under uvloop and asyncio.

Covers coalescing, holds, the direct ``os.write`` path and its hand-over to the
transport when the kernel refuses bytes, the slow-consumer cut-off, writes after
close, a peer reset, and TLS (never written directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

import gateway.connection as connection
import gateway.outbox as outbox
from businessworker.testing import TIMEOUT
from gateway.connection import ClientConnection, text_frame
from gateway.outbox import Outbox

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class FakeGateway:
    """A ``ConnectionOwner`` as small as can be; the outbox is the real one."""

    max_message_size = 1 << 20
    max_fragments = 1024

    def __init__(self, max_send_buffer: int = 1 << 20) -> None:
        self.outbox = Outbox(max_send_buffer)
        self.stats_slow_closed = 0
        self.closed_conns: list[ClientConnection] = []
        self.gone = asyncio.Event()
        """set when a connection reported itself closed"""
        self.cut = asyncio.Event()
        """set when a connection was cut off as too slow"""

    def opened(self, conn: ClientConnection, path: str, headers: Any) -> None:
        conn.client_id = 1

    def received(self, conn: ClientConnection, message: str | bytes) -> None:
        pass

    def closed(self, conn: ClientConnection) -> None:
        self.closed_conns.append(conn)
        self.gone.set()

    def cut_off(self, conn: ClientConnection) -> None:
        self.stats_slow_closed += 1
        self.cut.set()


def run(loop: str, test: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(test(), 2 * TIMEOUT))


async def turn(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def until(condition: Callable[[], Any], pace: float = 0.0) -> None:
    """Until ``condition()`` holds, looking again every loop turn (or ``pace`` s); a
    test that waits longer than TIMEOUT fails."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(pace)


class Watched(ClientConnection):
    """A connection that tells when the transport refused or took back direct writes,
    and when it was lost."""

    __slots__ = ("direct", "lost", "refused")

    def __init__(self, gateway: Any) -> None:
        super().__init__(gateway)
        self.lost = asyncio.Event()
        self.refused = asyncio.Event()
        """set by pause_writing: the transport holds bytes, direct writes stop"""
        self.direct = asyncio.Event()
        """set by resume_writing once direct writes may go again"""

    def pause_writing(self) -> None:
        super().pause_writing()
        self.refused.set()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.fd >= 0:
            self.direct.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.lost.set()


def socket_pair(
    *, sndbuf: int | None = None, rcvbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    """(the gateway's accepted socket, the client's non-blocking one), on loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        if rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
    if sndbuf:
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    client.setblocking(False)
    return accepted, client


async def open_pair(
    gw: FakeGateway, *, sndbuf: int | None = None, rcvbuf: int | None = None
) -> tuple[Watched, socket.socket]:
    """A connection past its opening handshake, and the client's raw non-blocking socket."""
    loop = asyncio.get_running_loop()
    accepted, client = socket_pair(sndbuf=sndbuf, rcvbuf=rcvbuf)
    conn = Watched(gw)
    await loop.connect_accepted_socket(lambda: conn, accepted)
    await loop.sock_sendall(client, UPGRADE)
    response = b""
    while b"\r\n\r\n" not in response:
        response += await loop.sock_recv(client, 4096)
    assert response.startswith(b"HTTP/1.1 101")
    assert conn.writable and conn.fd >= 0
    conn.refused.clear()
    conn.direct.clear()
    return conn, client


async def read_exactly(client: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(client, size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


def counting_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every direct write."""
    sizes: list[int] = []
    real = outbox._write

    def write(fd: int, data: bytes) -> int:
        sent = real(fd, data)
        sizes.append(sent)
        return sent

    monkeypatch.setattr(outbox, "_write", write)
    return sizes


def numbered(i: int) -> bytes:
    return text_frame(f"{i:06d}" + "x" * 500)


@pytest.mark.parametrize("loop", LOOPS)
def test_frames_of_one_turn_leave_in_one_write(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        gw = FakeGateway()
        conn, client = await open_pair(gw)
        assert conn.fd >= 0
        writes = counting_writes(monkeypatch)
        frames = [text_frame(f"m{i}") for i in range(3)]
        conn.write(frames[0])
        assert conn.out == frames[0]  # one frame is kept as is, not in a list
        conn.write(frames[1])
        conn.write(frames[2])
        await turn()
        assert writes == [sum(map(len, frames))]
        assert await read_exactly(client, writes[0]) == b"".join(frames)
        client.close()

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_held_frames_follow_the_direct_one(loop: str) -> None:
    async def test() -> None:
        gw = FakeGateway()
        conn, client = await open_pair(gw)
        conn.hold_until_direct()
        group = [text_frame("g1"), text_frame("g2")]
        for f in group:
            conn.write(f)
        await turn()
        assert conn.out is None
        snapshot = text_frame("snapshot")
        conn.write_direct(snapshot)
        await turn()
        expected = snapshot + b"".join(group)
        assert await read_exactly(client, len(expected)) == expected
        client.close()

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_hold_ended_by_its_snapshot_takes_its_timer_with_it(loop: str) -> None:
    async def test() -> None:
        conn, client = await open_pair(FakeGateway())
        conn.hold_until_direct()
        first = conn._hold_timer
        conn.write_direct(text_frame("snapshot"))
        assert conn.hold is None and conn._hold_timer is None and first.cancelled()
        conn.hold_until_direct()  # a later hold: only its own timer may end it
        second = conn._hold_timer
        assert second is not first and not second.cancelled()
        conn.connection_lost(None)
        assert conn._hold_timer is None and second.cancelled()
        client.close()

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_what_the_kernel_refuses_goes_through_the_transport_in_order(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def test() -> None:
        gw = FakeGateway(max_send_buffer=64 << 20)
        conn, client = await open_pair(gw, sndbuf=4096, rcvbuf=4096)
        writes = counting_writes(monkeypatch)
        sent = 0
        async with asyncio.timeout(TIMEOUT):
            while not conn.refused.is_set():  # until the kernel takes no more
                conn.write(numbered(sent))
                sent += 1
                await turn(1)
        assert conn.fd == -1  # the transport holds the rest
        direct = len(writes)
        for _ in range(20):  # these go through the transport, behind what it holds
            conn.write(numbered(sent))
            sent += 1
            await turn(1)
        assert len(writes) == direct
        size = len(numbered(0))
        data = await read_exactly(client, sent * size)
        assert [data[i * size + 4 : i * size + 10] for i in range(sent)] == [
            b"%06d" % i for i in range(sent)
        ]
        await asyncio.wait_for(conn.direct.wait(), TIMEOUT)  # drained: the descriptor is back
        assert conn.fd >= 0
        conn.write(numbered(sent))
        await turn()
        assert len(writes) == direct + 1
        assert await read_exactly(client, size) == numbered(sent)
        client.close()

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_slow_consumer_is_cut_off(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 0.2)

    async def test() -> None:
        gw = FakeGateway(max_send_buffer=64 << 10)
        conn, client = await open_pair(gw, sndbuf=4096, rcvbuf=4096)
        frame = text_frame("y" * 4000)
        async with asyncio.timeout(TIMEOUT):
            while not gw.cut.is_set():
                conn.write(frame)
                await turn(1)
        assert gw.stats_slow_closed == 1
        assert not conn.writable and conn.fd == -1 and not conn.open
        conn.write(frame)
        assert conn.out is None  # nothing is queued once closing
        await asyncio.wait_for(gw.gone.wait(), TIMEOUT)  # the abort after CLOSE_TIMEOUT
        assert gw.closed_conns == [conn]
        with pytest.raises(ConnectionResetError):  # SO_LINGER 0: reset, not a FIN
            while client.recv(1 << 20):
                pass
        client.close()

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_flushes_first_and_then_writes_nothing(loop: str) -> None:
    async def test() -> None:
        gw = FakeGateway()
        conn, client = await open_pair(gw)
        last = text_frame("last")
        conn.write(last)
        conn.close(1000, "bye")
        conn.write(text_frame("too late"))
        assert conn.out is None
        await turn()
        got = await read_exactly(client, len(last) + 2)
        assert got[: len(last)] == last
        assert got[len(last)] == 0x88  # the close frame comes right after
        body = await read_exactly(client, got[-1])
        assert struct.unpack("!H", body[:2]) == (1000,)
        client.close()  # the client answers with EOF: the connection goes
        await asyncio.wait_for(gw.gone.wait(), TIMEOUT)
        assert gw.closed_conns == [conn]
        assert conn.fd == -1

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_reset_closes_the_connection_quietly(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def test() -> None:
        gw = FakeGateway()
        conn, client = await open_pair(gw)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        i = 0
        async with asyncio.timeout(TIMEOUT):
            while not gw.gone.is_set():  # writing on until a write meets the reset
                conn.write(numbered(i))
                i += 1
                await asyncio.sleep(0.01)
        assert gw.closed_conns == [conn]
        assert conn.fd == -1

    run(loop, test)
    assert "write failed" not in caplog.text


class TlsTransport(asyncio.Transport):
    """A transport that reports a TLS context, as asyncio's and uvloop's TLS ones do."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sslcontext": object(), "socket": self.sock}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))


def test_tls_frames_always_go_through_the_transport() -> None:
    async def test() -> None:
        gw = FakeGateway()
        conn = ClientConnection(gw)  # type: ignore[arg-type]
        with socket.socket() as sock:
            transport = TlsTransport(sock)
            conn.connection_made(transport)
            conn.data_received(UPGRADE)
            assert conn.writable and conn.fd == -1
            conn.write(text_frame("secret"))
            await turn()
            assert transport.written[-1] == text_frame("secret")
            with contextlib.suppress(Exception):
                conn.connection_lost(None)

    run("uvloop", test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handshake_that_never_completes_gets_408_and_is_closed(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "HANDSHAKE_TIMEOUT", 0.2)

    async def test() -> None:
        loop_ = asyncio.get_running_loop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.socket()
            client.connect(listener.getsockname())
            accepted, _ = listener.accept()
        client.setblocking(False)
        conn = ClientConnection(FakeGateway())  # type: ignore[arg-type]
        await loop_.connect_accepted_socket(lambda: conn, accepted)
        await loop_.sock_sendall(client, UPGRADE[:20])  # a start, then nothing
        response = b""
        while chunk := await loop_.sock_recv(client, 4096):  # until the gateway closes
            response += chunk
        assert response.startswith(b"HTTP/1.1 408 ")
        assert not conn.open
        client.close()

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_finished_handshake_leaves_no_timer_holding_the_connection(loop: str) -> None:
    async def test() -> None:
        loop_ = asyncio.get_running_loop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(2)
            clients = [socket.socket() for _ in range(2)]
            for c in clients:
                c.connect(listener.getsockname())
            accepted = [listener.accept()[0] for _ in clients]
        conns = [Watched(FakeGateway()) for _ in clients]  # type: ignore[arg-type]
        for conn, sock in zip(conns, accepted, strict=True):
            await loop_.connect_accepted_socket(lambda conn=conn: conn, sock)
        timers = [conn._handshake_timer for conn in conns]
        assert all(t is not None and not t.cancelled() for t in timers)
        conns[0].data_received(UPGRADE)  # accepted
        clients[1].close()  # gone before finishing its handshake
        await asyncio.wait_for(conns[1].lost.wait(), 5)
        assert conns[0]._handshake_timer is None and timers[0].cancelled()
        assert conns[1]._handshake_timer is None and timers[1].cancelled()
        with contextlib.suppress(Exception):
            conns[0].connection_lost(None)
        clients[0].close()

    run(loop, test)
