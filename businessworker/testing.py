"""Test an app's callbacks in-process, with pytest: ``businessworker.testing``.

    from businessworker.testing import Harness

    async def test_a_login_is_announced() -> None:
        async with Harness("businessworker.chat") as h:
            bob = await h.connect()
            await bob.send({"type": "login", "name": "bob"})
            assert (await bob.receive())["type"] == "user_list"
            alice = await h.connect(gateway=1)           # on the other gateway
            await alice.send({"type": "login", "name": "alice"})
            assert (await bob.receive())["name"] == "alice"
            await h.settle()                             # everything caused has arrived
            assert bob.inbox == []                       # so nothing else came
            assert h.groups(alice) == ["room:"]

A ``Harness`` starts a register, gateways and workers of this very code in the
test's event loop: the real dispatcher, API, gateway command handling, client
table and streams, linked over loopback ZeroMQ (no key: nothing leaves the
machine's loopback), and clients that are real WebSocket connections. What a
handler does here it does in the cluster; only the processes are gone, so a
test takes milliseconds instead of seconds of process start-up.

Nothing here waits for time to pass. ``receive()`` waits for the next frame (up
to ``TIMEOUT``, for a test that would hang); ``settle()`` waits until every
gateway has read what its clients sent (a ping answered behind it), every event
is handled, every command carried out, every history message delivered to every
gateway, and then puts a fence frame behind everything each client was
sent: when it returns, ``client.inbox`` holds all of it, and an empty inbox
shows that nothing else came.

``kill_worker`` and ``kill_gateway`` make a process die as a SIGKILL would (no
goodbye, sockets gone); ``start_gateway`` and ``start_worker`` add new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import zmq
import zmq.asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from businessworker.app import App
from businessworker.worker import Worker
from gateway import protocol as gateway_protocol
from gateway.connection import text_frame
from gateway.server import Gateway, GatewayConfig
from register.server import Register

TIMEOUT = float(os.environ.get("CHAT_TEST_TIMEOUT", "10"))
"""Seconds any single wait may take before it fails (CHAT_TEST_TIMEOUT on slow machines)."""
FENCE = "\x00businessworker.testing fence\x00"
LINK_TIMEOUT = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Until ``condition()`` holds (it reads in-process state; each look is a loop turn)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (waited {timeout:g} s)")
        await asyncio.sleep(0.001)


class TestClient:
    """One WebSocket client of the harness: what it sends and everything it receives."""

    __test__ = False  # not a pytest test class

    def __init__(self, harness: Harness, ws: ClientConnection, gateway: int) -> None:
        self.harness = harness
        self.ws = ws
        self.gateway = gateway
        """index of the gateway it is connected to"""
        self.id = 0
        """its client id (as the callbacks see it)"""
        self.inbox: deque[Any] = deque()
        """frames received and not yet taken by ``receive``: JSON text decoded, the rest
        as str or bytes"""
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._arrived = asyncio.Event()
        self._fences = 0
        self._closed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def send(self, message: Any) -> None:
        """A frame from the client: str and bytes as they are, anything else as JSON."""
        if not isinstance(message, str | bytes):
            message = json.dumps(message)
        await self.ws.send(message)

    async def receive(self, timeout: float = TIMEOUT) -> Any:
        """The next frame, waiting for it; TimeoutError if none comes within ``timeout``."""
        async with asyncio.timeout(timeout):
            while not self.inbox:
                if self._closed.is_set():
                    raise ConnectionError(f"closed with {self.close_code}: nothing more comes")
                self._arrived.clear()
                await asyncio.wait(
                    [
                        asyncio.ensure_future(self._arrived.wait()),
                        asyncio.ensure_future(self._closed.wait()),
                    ],
                    return_when=asyncio.FIRST_COMPLETED,
                )
        return self.inbox.popleft()

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame, which must be a JSON object of ``"type": kind``."""
        message = await self.receive(timeout)
        assert isinstance(message, dict) and message.get("type") == kind, (
            f"expected {kind!r}, got {message!r}"
        )
        return message

    async def closed(self, timeout: float = TIMEOUT) -> tuple[int | None, str | None]:
        """Wait until the server closed this client: (code, reason)."""
        async with asyncio.timeout(timeout):
            await self._closed.wait()
        return self.close_code, self.close_reason

    async def close(self, code: int = 1000) -> None:
        """Close from the client's side (a close frame: it leaves)."""
        await self.ws.close(code)
        await self._closed.wait()

    async def drop(self) -> None:
        """The client's network goes: the TCP connection ends without a close frame."""
        transport = self.ws.transport
        transport.abort()
        await self._closed.wait()

    @property
    def session(self) -> dict[str, Any] | None:
        """Its session as its gateway holds it (None once it is gone)."""
        return self.harness.session(self)

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.ws.recv()
                if frame == FENCE:
                    self._fences += 1
                else:
                    if isinstance(frame, str):
                        with contextlib.suppress(ValueError):
                            frame = json.loads(frame)
                    self.inbox.append(frame)
                self._arrived.set()
        except ConnectionClosed as exc:
            received = exc.rcvd
            self.close_code = received.code if received else None
            self.close_reason = received.reason if received else None
        finally:
            self._closed.set()
            self._arrived.set()


class Harness:
    """A register, ``gateways`` gateways and ``workers`` workers running ``app``, in-process."""

    def __init__(
        self,
        app: str | ModuleType,
        *,
        gateways: int = 2,
        workers: int = 2,
        link_timeout: float = LINK_TIMEOUT,
    ) -> None:
        self.module = importlib.import_module(app) if isinstance(app, str) else app
        self.app = App.load(self.module)
        self.n_gateways = gateways
        self.n_workers = workers
        self.link_timeout = link_timeout
        self.ctx = zmq.asyncio.Context()
        self.register_address = f"tcp://127.0.0.1:{_free_port()}"
        self.register: Register | None = None
        self.gateways: list[Gateway | None] = []
        self.workers: list[Worker | None] = []
        self.clients: list[TestClient] = []
        self._tasks: dict[object, asyncio.Task[None]] = {}

    # Lifecycle

    async def __aenter__(self) -> Harness:
        try:
            self.register = Register(
                self.register_address,
                ctx=self.ctx,
                link_timeout=self.link_timeout,
                streams_settle=0.0,  # clients come only once every stream socket is known
            )
            self._spawn(self.register)
            for _ in range(self.n_gateways):
                self._start_gateway()
            for _ in range(self.n_workers):
                self._start_worker()
            await self.ready()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            client._reader.cancel()
            with contextlib.suppress(Exception):
                client.ws.transport.abort()
        # Workers first (their goodbyes are answered by live gateways), then gateways.
        for members in (self.workers, self.gateways, [self.register]):
            tasks = []
            for member in members:
                if member is not None and member in self._tasks:
                    member.stop()
                    tasks.append(self._tasks[member])
            if tasks:
                await asyncio.wait(tasks, timeout=TIMEOUT)
        for task in self._tasks.values():
            task.cancel()
        self.ctx.destroy(linger=0)

    def _spawn(self, member: Any) -> None:
        self._tasks[member] = asyncio.ensure_future(member.run())

    def _start_gateway(self) -> int:
        config = GatewayConfig(
            host="127.0.0.1",
            port=0,
            internal="tcp://127.0.0.1:*",
            registers=[self.register_address],
            reuse_port=False,
            link_timeout=self.link_timeout,
            drain_time=1.0,
        )
        gateway = Gateway(config, ctx=self.ctx)
        self.gateways.append(gateway)
        self._spawn(gateway)
        return len(self.gateways) - 1

    def _start_worker(self) -> int:
        worker = Worker(
            self.app, [self.register_address], ctx=self.ctx, link_timeout=self.link_timeout
        )
        self.workers.append(worker)
        self._spawn(worker)
        return len(self.workers) - 1

    async def start_gateway(self) -> int:
        """Add a gateway; returns its index once every worker is linked to it."""
        i = self._start_gateway()
        await self.ready()
        return i

    async def start_worker(self) -> int:
        """Add a worker; returns its index once it is linked to every gateway."""
        i = self._start_worker()
        await self.ready()
        return i

    async def ready(self) -> None:
        """Until every live gateway serves and is linked to every live worker."""
        assert self.register is not None
        register = self.register
        gateways = [g for g in self.gateways if g is not None]
        workers = [w for w in self.workers if w is not None]

        def linked() -> bool:
            for member, task in self._tasks.items():
                if task.done() and member in (*gateways, *workers, register):
                    task.result()  # a member that failed to start: its error, here
            return (
                all(g.client_port is not None for g in gateways)
                and all(g.pool.live == len(workers) for g in gateways)
                and all(len(w.links) == len(gateways) for w in workers)
                and len(register.stream_routes) == len(gateways)
                and all(gid in register.interest for gid in register.stream_routes)
            )

        await _until(linked, "the harness's cluster did not come up")

    # Clients

    async def connect(
        self,
        path: str = "/",
        *,
        query: str | dict[str, str] | None = None,
        headers: dict[str, str] | Sequence[tuple[str, str]] | None = None,
        gateway: int = 0,
    ) -> TestClient:
        """A client connects to ``gateway``; returns once its connect callbacks ran."""
        server = self.gateways[gateway]
        port = None if server is None else server.client_port
        assert port is not None, f"gateway {gateway} is dead"
        if isinstance(query, dict):
            query = "&".join(f"{k}={v}" for k, v in query.items())
        url = f"ws://127.0.0.1:{port}{path}" + (f"?{query}" if query else "")
        ws = await connect(
            url, additional_headers=headers, compression=None, max_queue=None, max_size=2**24
        )
        client = TestClient(self, ws, gateway)
        self.clients.append(client)
        local = ws.transport.get_extra_info("sockname")[1]

        def known() -> bool:
            for conn in server.clients:
                peer = conn.transport.get_extra_info("peername") if conn.transport else None
                if peer is not None and peer[1] == local:
                    client.id = conn.client_id
                    return True
            return False

        await _until(known, "the gateway did not take the connection in")
        await self.settle()
        return client

    # Facts

    def _where(self, client: TestClient | int) -> tuple[Gateway | None, int]:
        """The gateway that holds a client (None if none does), and its id."""
        client_id = client if isinstance(client, int) else client.id
        for gateway in self.gateways:
            if gateway is not None and gateway.clients.get(client_id) is not None:
                return gateway, client_id
        return None, client_id

    def _conn(self, client: TestClient | int) -> Any:
        gateway, client_id = self._where(client)
        return None if gateway is None else gateway.clients.get(client_id)

    def session(self, client: TestClient | int) -> dict[str, Any] | None:
        """A client's session as its gateway holds it, or None."""
        conn = self._conn(client)
        return None if conn is None else gateway_protocol.unpack_session(conn.session)

    def groups(self, client: TestClient | int) -> list[str]:
        """The groups a client is in, sorted."""
        gateway, client_id = self._where(client)
        return [] if gateway is None else gateway.clients.groups_of(client_id)

    def uid(self, client: TestClient | int) -> str | None:
        gateway, client_id = self._where(client)
        return None if gateway is None else gateway.clients.uid_of(client_id)

    def members(self, group: str) -> list[int]:
        """Client ids of a group on every gateway, sorted (away members included)."""
        return sorted(
            cid for g in self.gateways if g is not None for cid in g.clients.members(group)
        )

    def online(self, client: TestClient | int) -> bool:
        return self._conn(client) is not None

    # Waiting for facts

    def _busy(self) -> str | None:
        """What is still under way, or None when nothing is (see ``settle``)."""
        register = self.register
        for n, gateway in enumerate(self.gateways):
            if gateway is None:
                continue
            if gateway.pool.busy:
                return f"gateway {n} has events its workers did not acknowledge"
            if gateway.streams.unconfirmed:
                return f"gateway {n} has history messages the register did not confirm"
            for group, state in gateway.streams.groups.items():
                if state.waiting is not None:
                    return f"gateway {n} is filling a gap in {group}"
                kept = register.streams.streams.get(group) if register else None
                if (
                    kept is not None
                    and gateway.clients.members(group)
                    and (state.epoch, state.offset) != (kept.epoch, kept.last)
                ):
                    return f"gateway {n} is behind the register in {group}"
        for n, worker in enumerate(self.workers):
            if worker is not None and worker.dispatcher.tasks:
                return f"worker {n} has callbacks running"
        return None

    def _quiet(self) -> bool:
        return self._busy() is None

    async def settle(self) -> None:
        """Until everything the clients caused is done and has reached them (see the
        module docstring): then every client's inbox holds all it was sent."""

        # What each client sent has been read by its gateway once its ping is answered
        # (the gateway reads a connection's frames in order, and makes each an event).
        pongs = []
        for client in self.clients:
            if not client._closed.is_set():
                with contextlib.suppress(ConnectionClosed):
                    pongs.append(await client.ws.ping())
        if pongs:
            async with asyncio.timeout(TIMEOUT):
                await asyncio.gather(*pongs, return_exceptions=True)
        for _ in range(2):  # twice: what the first quiet moment set off settles too
            try:
                await _until(self._quiet, "")
            except TimeoutError:
                raise TimeoutError(f"the cluster did not settle: {self._busy()}") from None
            await asyncio.sleep(0)
        fenced = []
        frame = text_frame(FENCE)
        for client in self.clients:
            if client._closed.is_set():
                continue
            conn = self._conn(client)
            if conn is None or conn.transport is None:
                continue
            want = client._fences + 1
            conn.write_direct(frame)
            fenced.append((client, want))
        await _until(
            lambda: all(c._fences >= n or c._closed.is_set() for c, n in fenced),
            "a fence did not come back",
        )

    # Faults

    async def kill_worker(self, i: int) -> None:
        """Worker ``i`` dies as a SIGKILL would: no goodbye; its events go to others."""
        worker = self.workers[i]
        assert worker is not None
        self.workers[i] = None
        worker.register.bye = lambda member_id: None  # type: ignore[method-assign]
        for link in worker.links.all():
            link.flush = lambda: None  # type: ignore[method-assign]  # nothing more leaves
        await self._cancel(worker)
        live = len([w for w in self.workers if w is not None])
        await _until(
            lambda: all(g.pool.live == live for g in self.gateways if g is not None),
            "the gateways did not notice a dead worker",
        )

    async def kill_gateway(self, i: int) -> None:
        """Gateway ``i`` dies as a SIGKILL would: its clients' connections are cut without
        a close frame, nothing more leaves it; returns once every worker took it in."""
        gateway = self.gateways[i]
        assert gateway is not None
        self.gateways[i] = None
        gone = gateway.id
        gateway.register.bye = lambda member_id: None  # type: ignore[method-assign]
        gateway.pool.post = lambda worker_id, frame: None  # type: ignore[method-assign]
        gateway.pool.flush = lambda: None  # type: ignore[method-assign]
        gateway.streams._send = lambda frame, to=None: None  # type: ignore[method-assign]
        for conn in list(gateway.clients):
            if conn.transport is not None:
                conn.transport.abort()
        await self._cancel(gateway)
        await _until(
            lambda: all(w.links.links.get(gone) is None for w in self.workers if w is not None),
            "the workers did not notice a dead gateway",
            timeout=TIMEOUT + self.link_timeout + 5,
        )

    async def _cancel(self, member: Any) -> None:
        task = self._tasks.pop(member)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
