"""A ping flood that never reads, against a real gateway: cut off, reset, and harmless.

The flooder is a raw socket with a 4 KiB receive buffer that does the opening
handshake and then only sends masked pings (at most 80,000, for at most 10 s).
Before the fix every pong it did not read stayed in the gateway: 12.1 MiB for
80,000 pings, with no close and no log line.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.frames import Frame, Opcode

from tests.chat import ChatClient
from tests.cluster import Cluster

PING = Frame(Opcode.PING, b"p" * 125).serialize(mask=True)
MAX_PINGS = 80_000
FLOOD_SECONDS = 10.0
SAYS = 200
MIB = 1 << 20
TCP_CLOSE = 7
UPGRADE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
CUT_OFF = "client too slow, closing"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(gateways=1, workers=2) as c:
        yield c


def rss(pid: int) -> int:
    """The process's resident set, in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def tcp_state(sock: socket.socket) -> int:
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[:1])[0]


@dataclass
class Flood:
    """What the flooder did, filled in by its thread."""

    port: int
    started: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    """bytes of pings sent"""
    began: float = 0.0
    reset_at: float | None = None

    @property
    def pings(self) -> int:
        return self.sent // len(PING)

    def run(self) -> None:
        """Handshake, then pings flat out without reading, until reset (or the limits)."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(UPGRADE.format(port=self.port).encode())
        response = b""
        while b"\r\n\r\n" not in response:  # the 101, the only thing it ever reads
            chunk = sock.recv(1024)
            assert chunk, "closed during the handshake"
            response += chunk
        assert response.startswith(b"HTTP/1.1 101"), response
        sock.settimeout(0.05)
        batch = memoryview(PING * 100)
        offset = 0
        self.began = time.monotonic()
        deadline = self.began + FLOOD_SECONDS
        try:
            while self.sent + len(batch) <= MAX_PINGS * len(PING) and not self.stop.is_set():
                if time.monotonic() > deadline:
                    break
                try:
                    n = sock.send(batch[offset:])
                except TimeoutError:  # the gateway no longer reads it
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    self.reset_at = time.monotonic()
                    return
                self.sent += n
                offset = (offset + n) % len(batch)
                self.started.set()
            # Out of pings or time before the reset: wait for it without reading.
            while self.reset_at is None and not self.stop.is_set():
                if tcp_state(sock) == TCP_CLOSE:
                    self.reset_at = time.monotonic()
                elif time.monotonic() > deadline + 10:
                    return
                else:
                    time.sleep(0.01)
        finally:
            self.started.set()
            sock.close()


async def test_a_ping_flood_that_never_reads_is_cut_off_and_nobody_else_notices(
    cluster: Cluster,
) -> None:
    gateway = cluster.gateways[0]
    assert gateway is not None
    url = cluster.ws_url(0)
    alice, bob = await ChatClient.open(url), await ChatClient.open(url)
    await alice.login("alice", room="bounds")
    await bob.login("bob", room="bounds")
    assert (await alice.expect("login"))["name"] == "bob"

    async def say(n: int) -> None:
        """One numbered say, alternately from each; both must get it before the next."""
        await (alice if n % 2 == 0 else bob).say(f"say {n}")
        for client in (alice, bob):
            got = await client.expect("say")
            assert got["content"] == f"say {n}", got

    for n in range(20):  # warm up the chat path before measuring
        await say(-1 - n)
    before = rss(gateway.pid)
    peak = before
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss(gateway.pid))
            await asyncio.sleep(0.005)

    async def cut_off() -> float:
        """When the gateway's log says it cut a client off (polled; at most 15 s)."""
        for _ in range(3000):
            if CUT_OFF in cluster.logs():
                return time.monotonic()
            await asyncio.sleep(0.005)
        raise AssertionError(f"no cut-off logged:\n{cluster.logs()}")

    flood = Flood(cluster.ws_ports[0])
    flooder = asyncio.create_task(asyncio.to_thread(flood.run))
    sampler = asyncio.create_task(sample())
    try:
        assert await asyncio.to_thread(flood.started.wait, 10)
        watcher = asyncio.create_task(cut_off())
        chat_began = time.monotonic()
        for n in range(SAYS):  # meanwhile, the chat goes on
            await say(n)
        chat_took = time.monotonic() - chat_began
        cut_at = await watcher
        await asyncio.wait_for(flooder, 30)
        assert flood.reset_at is not None, "no reset"
    finally:
        flood.stop.set()
        sampling = False
        await sampler
    after = rss(gateway.pid)
    print(
        f"\nflood: {flood.pings} pings sent, cut off {cut_at - flood.began:.2f} s after the "
        f"first, reset {flood.reset_at - cut_at:.2f} s after that; {SAYS} says in "
        f"{chat_took:.2f} s meanwhile; gateway RSS before {before / MIB:.2f} MiB, peak "
        f"{peak / MIB:.2f} (+{(peak - before) / MIB:.2f}), after {after / MIB:.2f} "
        f"(+{(after - before) / MIB:.2f})"
    )
    assert flood.pings <= MAX_PINGS
    assert cluster.logs().count(CUT_OFF) == 1
    assert peak - before <= 2 * MIB
    # the others lost nothing, and the chat still works after the flooder is gone
    await say(SAYS)
    await alice.close()
    await bob.close()
