"""The gateway process: client WebSockets outside, business workers inside."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl as ssl_module
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from chatcluster import auth, links
from chatcluster.cli import USAGE, OperatorError, os_reason, zmq_failure
from chatcluster.keys import Keys, check_exposure
from chatcluster.process import Lifecycle
from gateway import metrics, protocol
from gateway.clients import ClientTable
from gateway.commands import Commands
from gateway.connection import ClientConnection
from gateway.ids import IdAllocator, fresh_prefix
from gateway.outbox import Outbox
from gateway.presence import Presence
from gateway.streams import StreamLink
from gateway.workers import WorkerPool
from gateway.zmqreader import BatchReader
from register import protocol as register_protocol
from register.client import RegisterClient

log = logging.getLogger("gateway")

BATCH = 2000
"""Worker messages handled per wake-up before the loop gets a turn."""


@dataclass
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 7272
    internal: str = "tcp://127.0.0.1:*"
    """ZeroMQ bind address for workers; ``*`` as port picks a free one."""
    advertise: str | None = None
    """Address workers should connect to, when it differs from the bind address."""
    registers: Sequence[str] = field(default_factory=lambda: [register_protocol.DEFAULT_ADDRESS])
    max_message_size: int = 64 * 1024
    """Bytes of one client message, across its fragments (over it: close 1009).
    Also what a half-sent frame can make the parser hold."""
    max_fragments: int = 1024
    """Frames of one client message (over it: close 1009, logged at INFO). Empty
    continuation frames never reach ``max_message_size``; 1,024 lets a client
    stream a 64 KiB message in 64-byte pieces."""
    max_send_buffer: int = 1024 * 1024
    """Bytes we may hold unsent for one client, app frames and the protocol's own
    (pongs, close) alike; over it: close 1008, a WARNING, a reset 5 s later."""
    max_waiting: int = 10_000
    """Events waiting, gateway-wide, while no worker is linked; a client whose
    event does not fit is closed with 1013."""
    flood_limit: int = 100
    """Events of one client not yet acknowledged (sent to a worker, waiting for
    one, or parked); at the limit the client is not read until half are."""
    reuse_port: bool = True
    drain_batch: int = 500
    """Clients closed per tick (50 ms) when the gateway stops, so they do not all
    reconnect elsewhere at the same instant."""
    drain_time: float = 5.0
    """The drain never takes longer than this: batches grow to fit."""
    keys: Keys | None = None
    """The cluster key for the internal links; None for plain links (--insecure)."""
    link_timeout: float = links.LINK_TIMEOUT
    """Seconds a silent link is waited for (``chatcluster.links``)."""
    ssl: ssl_module.SSLContext | None = None
    """TLS for the client side (wss://), or None."""


class Gateway(Lifecycle):
    """Holds client connections and carries out the workers' commands."""

    def __init__(self, config: GatewayConfig, *, ctx: zmq.asyncio.Context | None = None) -> None:
        super().__init__()
        check_exposure(config.internal, config.keys)
        self.config = config
        self.max_message_size = config.max_message_size
        self.max_fragments = config.max_fragments
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.id = os.urandom(6).hex()
        self.started = time.time()
        self.ids = IdAllocator(fresh_prefix())
        self.clients = ClientTable()
        self.stats_slow_closed = 0
        self.outbox = Outbox(config.max_send_buffer)
        self._accepted = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None

    # Client side: the ConnectionOwner of every ClientConnection

    def opened(self, conn: ClientConnection, path: str, headers: list[tuple[str, str]]) -> None:
        conn.client_id = self.ids.next()
        self.clients.add(conn)
        url = urlsplit(path)
        peer = conn.transport.get_extra_info("peername")
        info = [url.path, url.query, headers, f"{peer[0]}:{peer[1]}" if peer else ""]
        self.pool.event(conn, protocol.EVENT_CONNECT, info)

    def received(self, conn: ClientConnection, message: str | bytes) -> None:
        if conn.client_id:  # 0: closed when this gateway was declared gone
            self.pool.event(conn, protocol.EVENT_MESSAGE, message)

    def closed(self, conn: ClientConnection) -> None:
        if self.presence.closed(conn):
            return  # a kept member: away for its grace, no close event yet
        self.streams.forget(conn)
        self.clients.remove(conn)
        self.pool.event(conn, protocol.EVENT_CLOSE)

    def cut_off(self, conn: ClientConnection) -> None:
        self.stats_slow_closed += 1

    @property
    def client_port(self) -> int | None:
        """The TCP port clients connect to, while it is serving (else None)."""
        server = self._server
        if server is None or not server.is_serving() or not server.sockets:
            return None
        return int(server.sockets[0].getsockname()[1])

    # Lifecycle

    async def run(self) -> None:
        asock = self.ctx.socket(zmq.ROUTER)
        asock.setsockopt(zmq.LINGER, 1000)
        asock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A session that reconnects replaces its half-dead old connection at once.
        asock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        links.unbounded(asock)
        links.heartbeats(asock, self.config.link_timeout)
        guard = auth.BoundGuard(self.ctx, asock, self.config.keys)
        try:
            # Both ports are taken before anything else, so a busy one is reported at
            # once; clients are served only once a register accepted our ids.
            try:
                asock.bind(self.config.internal)
            except zmq.ZMQError as exc:
                raise zmq_failure(
                    exc,
                    "bind the internal address",
                    self.config.internal,
                    "another gateway's? give another port, or tcp://HOST:* for any free one",
                ) from exc
            self.address = _advertised(
                asock.getsockopt_string(zmq.LAST_ENDPOINT), self.config.advertise
            )
            self._server = server = await self._listen()
        except BaseException:
            guard.close()
            raise
        reader = self._reader = BatchReader(asock, self._drain_workers)
        sock = self._sock = reader.sock
        self.pool = WorkerPool(
            sock,
            self.clients,
            max_waiting=self.config.max_waiting,
            flood_limit=self.config.flood_limit,
            on_sent=reader.sent,
        )
        self.streams = StreamLink(
            self.clients,
            list(self.config.registers),
            lambda: self.id,
            ctx=self.ctx,
            keys=self.config.keys,
            link_timeout=self.config.link_timeout,
        )
        self.presence = Presence(
            self.clients, self.pool, self.streams, lambda: ClientConnection(self)
        )
        self.commands = Commands(
            self.clients,
            self.pool,
            prefixes=lambda: self.ids.prefixes,
            on_declared_gone=self._declared_gone,
            gateway_id=lambda: self.id,
            streams=self.streams,
            presence=self.presence,
        )
        self.register = RegisterClient(
            self.config.registers,
            self._beat,
            self._from_register,
            ctx=self.ctx,
            keys=self.config.keys,
            link_timeout=self.config.link_timeout,
        )
        tasks = [
            self._background(self.register.run()),
            self._background(self.streams.run()),
            self._background(guard.watch(self._probe_workers)),
            self._background(self._expire_workers()),
        ]
        log.info("gateway starting id=%s internal=%s", self.id, self.address)
        try:
            if not await self._wait_accepted():
                return
            await server.start_serving()
            log.info(
                "gateway listening id=%s ws=%s:%d pid=%d",
                self.id,
                self.config.host,
                server.sockets[0].getsockname()[1],  # the port picked, for --listen HOST:0
                os.getpid(),
            )
            reading = self._background(reader.run())
            await self._stopping.wait()
            await self._drain_clients()
            reading.cancel()
        finally:
            server.close()
            self.presence.drop_all()  # the workers park them elsewhere once we are gone
            for task in tasks:
                task.cancel()
            self.register.bye(self.id)
            self.register.close()
            reader.stop()
            guard.close(linger=1000)
            log.info("gateway stopped id=%s", self.id)

    async def _listen(self) -> asyncio.AbstractServer:
        """Bind the client port, not yet serving; a port we cannot have is the operator's."""
        host, port = self.config.host, self.config.port
        try:
            return await asyncio.get_running_loop().create_server(
                lambda: ClientConnection(self),
                host,
                port,
                reuse_port=self.config.reuse_port,
                backlog=4096,
                ssl=self.config.ssl,
                start_serving=False,
            )
        except OSError as exc:
            why = os_reason(exc)
            if exc.errno == errno.EADDRINUSE:
                why += (
                    " (another program holds it: gateways of one account share a port, "
                    "nothing else can; stop it or give another --listen)"
                )
            raise OperatorError(f"cannot listen on {host}:{port}: {why}") from exc

    async def _wait_accepted(self) -> bool:
        """Serve clients only once a register accepted our id prefix (ids must be unique).

        A register that does not answer is reported by the register client, after
        5 s and every 30 s: no warning of our own here.
        """
        waiter = asyncio.create_task(self._accepted.wait())
        stopper = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        return self._accepted.is_set() and not self._stopping.is_set()

    async def _drain_clients(self) -> None:
        """Stop accepting; close every client with 1012 (reconnect elsewhere) in batches.

        Bounded in time: batches grow so that all are asked within ``drain_time``;
        clients that do not answer in time are cut. Then wait until the workers
        have handled every close event (so on_close ran for each client).
        """
        start = time.monotonic()
        if self._server is not None:
            self._server.close()
        conns = list(self.clients)
        tick = 0.05
        ticks = max(1, int(self.config.drain_time * 0.6 / tick))
        batch = max(self.config.drain_batch, -(-len(conns) // ticks))
        log.info("draining clients=%d batch=%d", len(conns), batch)
        batches = 0
        for first in range(0, len(conns), batch):
            for conn in conns[first : first + batch]:
                conn.close(1012, "gateway restarting, reconnect")
            batches += 1
            if first + batch < len(conns):
                await asyncio.sleep(tick)
        deadline = start + self.config.drain_time
        while self.presence.live and time.monotonic() < deadline:
            await asyncio.sleep(tick)
        for conn in list(self.clients):
            conn.abort()
        await asyncio.sleep(0)  # let connection_lost run for the aborted ones
        while self.pool.busy and self.pool.live and time.monotonic() < deadline + 2:
            await asyncio.sleep(tick)
        log.info(
            "drained in %.2f s, batches=%d unanswered=%d away=%d",
            time.monotonic() - start,
            batches,
            self.presence.live,
            len(self.presence.away),
        )

    # Workers side

    def _drain_workers(self) -> bool:
        sock, handle = self._sock, self.commands.handle
        for _ in range(BATCH):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            handle(parts)
        return True

    def _probe_workers(self) -> None:
        """A dropped TCP link means a worker may be gone (PINGs to live ones are ignored)."""
        self.pool.probe()

    async def _expire_workers(self) -> None:
        while True:
            await asyncio.sleep(protocol.HEARTBEAT)
            if not self._reader.has_input():  # unread input: not silence
                self.pool.expire(time.monotonic())

    # Register side

    def _beat(self) -> list[Any]:
        return [
            register_protocol.GATEWAY,
            {
                "id": self.id,
                "address": self.address,
                "prefixes": self.ids.prefixes,
                "started": self.started,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "connections": len(self.clients),
                "workers": self.pool.live,
                "metrics": metrics.snapshot(self),  # the register serves the cluster's
            },
        ]

    def _declared_gone(self) -> None:
        """The cluster gave up on this gateway (it was paused or cut off): start afresh.

        Its workers have run on_close for every client here, so those clients are
        closed with 1012 (the page reconnects and logs in again) without a close
        event of their own; what waited for a worker goes with them, and the
        gateway joins again under a new id and a new id prefix.
        """
        log.warning(
            "this gateway was declared gone (paused or cut off): closing its clients "
            "with 1012 so that they reconnect, joining again as a new gateway id=%s clients=%d",
            self.id,
            self.presence.live,
        )
        self.pool.reset()
        self.presence.drop_all()
        conns = list(self.clients)
        for conn in conns:
            self.streams.forget(conn)
            self.clients.remove(conn)
            conn.client_id = 0  # no close event: on_close ran already
            conn.close(1012, "gateway restarting, reconnect")
        self.id = os.urandom(6).hex()
        self.started = time.time()
        self.ids = IdAllocator(fresh_prefix(self.ids.prefix))
        self.register.beat_now()

    def _from_register(self, index: int, message: list[Any]) -> None:
        kind = message[0]
        if kind == register_protocol.GONE:
            if message[1] == self.id:
                self._declared_gone()
            return
        if kind == register_protocol.ACCEPTED:
            if self.ids.prefix in message[1] and not self._accepted.is_set():
                log.info("register accepted id prefix=%d", self.ids.prefix)
                self._accepted.set()
        elif kind == register_protocol.CONFLICT:
            prefix = message[1]
            if prefix == self.ids.prefix:
                self.ids.renew(after=prefix)
                log.info("prefix taken, claiming another old=%d new=%d", prefix, self.ids.prefix)
            elif prefix in self.ids.retired:
                self.ids.retired.remove(prefix)
                log.error("lost an id prefix still in use prefix=%d", prefix)
            self.register.beat_now()


def _advertised(bound: str, advertise: str | None) -> str:
    """The address workers should dial: --advertise, with ``*`` or 0 as port meaning ours.

    A wildcard bind (0.0.0.0, ::) is no address to dial, so it needs --advertise.
    """
    port = bound.rsplit(":", 1)[1]
    if advertise is None:
        if binds_everywhere(bound):
            raise OperatorError(
                f"the internal address {bound} binds every interface: say with --advertise "
                f"which address workers should dial (e.g. --advertise tcp://10.0.0.2:{port})",
                USAGE,
            )
        return bound
    head, _, tail = advertise.rpartition(":")
    return f"{head}:{port}" if tail in ("*", "0") else advertise


def binds_everywhere(address: str) -> bool:
    """True for a tcp:// address on every interface (0.0.0.0, ::, *): no address to dial."""
    return (urlsplit(address).hostname or "") in ("0.0.0.0", "::", "*")
