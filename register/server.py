"""The register process: one ROUTER socket, one table, pushes to workers."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import zmq
import zmq.asyncio

from chatcluster import auth, links
from chatcluster.cli import zmq_failure
from chatcluster.keys import Keys, check_exposure
from chatcluster.logs import Throttle, held_back
from chatcluster.process import Lifecycle
from register import protocol
from register.metrics import RegisterFigures
from register.streams import Streams
from register.table import Table

log = logging.getLogger("register")

SETTLE = 3 * protocol.HEARTBEAT
"""After this long up, every live gateway has beaten at least once."""
STREAMS_SETTLE = 0.7 * protocol.HEARTBEAT
"""Publishes are taken only after this long up (earlier ones wait): by then every
live gateway's stream socket beat (twice a heartbeat), so that a stream message
reaches all of them."""


class Register(Lifecycle):
    """Keeps the table of gateways and tells every worker when it changes."""

    def __init__(
        self,
        bind: str,
        *,
        keys: Keys | None = None,
        ctx: zmq.asyncio.Context | None = None,
        link_timeout: float = links.LINK_TIMEOUT,
        streams_settle: float = STREAMS_SETTLE,
    ) -> None:
        super().__init__()
        check_exposure(bind, keys)
        self.streams_settle = streams_settle
        """publishes wait this long after the start (every gateway's stream socket beat)"""
        self.link_timeout = link_timeout
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.bind = bind
        self.keys = keys
        self.id = uuid.uuid4().hex[:12]
        self.started = time.monotonic()
        self.table = Table(expiry=protocol.EXPIRY, grace=protocol.LINK_GRACE)
        self.worker_routes: dict[str, bytes] = {}
        self.gateway_routes: dict[str, bytes] = {}
        self.streams = Streams(self.id)
        self._expired_at = time.monotonic()
        self._early: list[list[Any]] = []
        """publishes that came before STREAMS_SETTLE"""
        self.stream_routes: dict[str, bytes] = {}
        """gateway id -> its stream socket's route: where stream messages go"""
        self.interest: dict[str, set[str]] = {}
        """gateway id -> the groups it has members of (interest routing); a gateway
        not in here (it has not told us yet) gets every stream message"""
        self._out: dict[bytes, list[bytes]] | None = None
        """while draining: frames to send per route, at the end of the batch"""
        self.stream_sends = 0
        """stream messages sent to gateways (status: what interest routing saves)"""
        self._pushed_version = -1
        self._was_settled = False
        self._refusals = Throttle()
        self.figures = RegisterFigures(self)
        """the register's counters and the members' latest snapshots (``register.metrics``)"""
        self._poll: asyncio.Future[int] | None = None
        """the wait for the next message, cut short by ``stop``"""

    def stop(self) -> None:
        super().stop()
        if self._poll is not None and not self._poll.done():
            self._poll.cancel()

    @property
    def settled(self) -> bool:
        return time.monotonic() - self.started >= SETTLE

    async def run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        links.heartbeats(sock, self.link_timeout)
        guard = auth.BoundGuard(self.ctx, sock, self.keys)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as exc:
            guard.close()
            hint = "another program, perhaps a register, holds it: stop it or give another --bind"
            raise zmq_failure(exc, "bind", self.bind, hint) from exc
        self.sock = zmq.Socket.shadow(sock.underlying)
        log.info(
            "register listening bind=%s id=%s curve=%s pid=%d",
            self.bind,
            self.id,
            "on" if self.keys else "off",
            os.getpid(),
        )
        ticker = self._background(self._tick())
        watcher = self._background(guard.watch(self._probe, self._refused_handshake))
        try:
            while not self._stopping.is_set():
                self._poll = sock.poll(500, zmq.POLLIN)
                try:
                    events = await self._poll
                except asyncio.CancelledError:
                    if self._stopping.is_set():
                        break  # stop() woke us: no need to wait out the poll
                    raise
                if events:
                    self._drain()
                self._push_if_changed()
        finally:
            ticker.cancel()
            watcher.cancel()
            guard.close()
            log.info("register stopped")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            workers = set(self.table.workers)
            for gid in self.table.expire(time.monotonic()):
                self.figures.drops["gateway"] += 1
                log.warning("gateway gone id=%s (its link dropped and it did not come back)", gid)
            self.figures.drops["worker"] += len(workers - set(self.table.workers))
            live = {m.entry["id"] for m in self.table.workers.values()}
            for wid in [w for w in self.worker_routes if w not in live]:
                del self.worker_routes[wid]
            for gid in [g for g in self.gateway_routes if g not in self.table.gateways]:
                del self.gateway_routes[gid]
            if self._early and time.monotonic() - self.started >= self.streams_settle:
                early, self._early = self._early, []
                for message in early:
                    self._publish(message, time.monotonic())
            if time.monotonic() - self._expired_at > 10.0:
                self._expired_at = time.monotonic()
                self.streams.expire(self._expired_at)
            for gid in [g for g in self.stream_routes if g not in self.table.gateways]:
                del self.stream_routes[gid]  # it beats again if it lives
                self.interest.pop(gid, None)
                if gid in self.table.gone:
                    self.streams.forget_gateway(gid)
            if self.settled and not self._was_settled:
                self._was_settled = True
                self._pushed_version = -1  # tell workers the table is now authoritative
            self._push_if_changed()

    def _drain(self) -> None:
        """Handle what came in; what it sends leaves as one message per peer.

        A gateway sends what it queued in one loop turn as the parts of one message,
        and gets what this turn made for it the same way: a stream message for 1,000
        members costs each gateway one wake-up per batch, not one per message.
        """
        now = time.monotonic()
        self._out = {}
        try:
            for _ in range(1000):
                try:
                    parts = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                route = parts[0]
                for frame in parts[1:]:
                    try:
                        self._handle(route, protocol.unpack(frame), now)
                    except (ValueError, KeyError, TypeError, IndexError) as exc:
                        log.warning("bad register message error=%r", exc)
        finally:
            out, self._out = self._out, None
            for route, frames in out.items():
                try:
                    self.sock.send_multipart([route, *frames], zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    log.debug("send failed route=%r error=%s", route, exc)

    def _handle(self, route: bytes, message: list[Any], now: float) -> None:
        kind = message[0]
        if kind == protocol.GATEWAY:
            entry = message[1]
            figures = self.figures
            if entry["id"] in self.table.gone:
                figures.refusals["gone"] += 1
                self._send(route, [protocol.GONE, entry["id"]])
                return
            if self.table.takeover(entry):
                figures.refusals["takeover"] += 1
                shown = self._refusals.hit(("takeover", entry["id"], entry["address"]))
                if shown is not None:
                    log.warning(
                        "refused a second gateway with a live gateway's id id=%s address=%s "
                        "claimed=%s%s",
                        entry["id"],
                        self.table.gateways[entry["id"]].entry["address"],
                        entry["address"],
                        held_back(shown),
                    )
                return
            known = entry["id"] in self.table.gateways
            self.gateway_routes[entry["id"]] = route
            figures.take(entry)
            refused = self.table.gateway_seen(entry, now)
            if not known:
                figures.joins["gateway"] += 1
                log.info("gateway joined id=%s address=%s", entry["id"], entry["address"])
            for prefix in refused:
                figures.refusals["prefix"] += 1
                log.info("prefix conflict gateway=%s prefix=%d", entry["id"], prefix)
                self._send(route, [protocol.CONFLICT, prefix])
            accepted = self.table.gateways[entry["id"]].entry["prefixes"]
            self._send(route, [protocol.ACCEPTED, accepted])
        elif kind == protocol.WORKER:
            entry = message[1]
            self.worker_routes[entry["id"]] = route
            self.figures.take(entry)
            if self.table.worker_seen(entry, now):
                self.figures.joins[entry.get("role", "worker")] += 1
                log.info("worker joined id=%s", entry["id"])
                self._send(route, self._gateways_message())
            else:
                self._send(route, [protocol.PONG, self.id])
        elif kind == protocol.BYE:
            member = message[1]
            if member in self.table.gateways:
                self.figures.leaves["gateway"] += 1
                log.info("gateway left id=%s", member)
            elif member in self.table.workers:
                self.figures.leaves[self.table.workers[member].entry.get("role", "worker")] += 1
                log.info("worker left id=%s", member)
            self.table.forget(member)
            self.worker_routes.pop(member, None)
            self.gateway_routes.pop(member, None)
        elif kind == protocol.PUBLISH:
            self._publish(message, now)
        elif kind == protocol.STREAMS:
            gid = message[1]
            if gid in self.table.gone:
                return
            if self.stream_routes.get(gid) != route:
                # New here: it may have missed what was sent before it beat, so it
                # learns where every stream stands (and fetches what it lacks).
                self._send(route, [protocol.POSITIONS, self.streams.positions()])
            self.stream_routes[gid] = route
            self._send(route, [protocol.STREAMS, self.streams.epoch, gid in self.interest])
        elif kind == protocol.FETCH:
            self._fetch(route, message, now)
        elif kind == protocol.INTEREST:
            gid, full, added, removed = message[1:5]
            if gid in self.table.gone:
                return
            if full:
                self.interest[gid] = set(added)
            elif gid in self.interest:
                groups = self.interest[gid]
                groups.update(added)
                groups.difference_update(removed)
        elif kind == protocol.STATUS:
            self._send(route, [protocol.STATUS, self.status()])
        else:
            raise ValueError(f"unknown message kind {kind!r}")

    def _publish(self, m: list[Any], now: float) -> None:
        source, n, first, group, data, exclude, count, seconds = m[1:9]
        if source in self.table.gone:
            return  # a gateway declared gone: what it still sends is not taken
        if now - self.started < self.streams_settle:
            # Not every gateway's stream socket is known yet: take it a moment later.
            if len(self._early) < 100_000:
                self._early.append(m)
            return
        before = m[9:11] or None
        entry = self.streams.publish(
            source, n, first, group, data, exclude, count, seconds, now, before
        )
        if entry is None:
            return
        epoch = self.streams.streams[group].epoch
        stream = [protocol.STREAM, epoch, group, entry.offset, data, exclude, source, n]
        frame = protocol.pack(stream + (before or []))  # sent again: where it had been
        interest = self.interest
        for gid, route in self.stream_routes.items():
            groups = interest.get(gid)
            if groups is None or group in groups or gid == source:
                self._send_frame(route, frame)
                self.stream_sends += 1

    def _fetch(self, route: bytes, m: list[Any], now: float) -> None:
        """Answer a FETCH; its gateway has members of the group from now on (the
        answer and what follows it must reach it, whatever its INTEREST said)."""
        req, group, epoch, offset = m[1:5]
        for gid, known in self.stream_routes.items():
            if known == route:
                groups = self.interest.get(gid)
                if groups is not None:
                    groups.add(group)
                break
        entries = self.streams.since(group, epoch, offset, now)
        found = (
            None
            if entries is None
            else [[e.offset, e.data, e.exclude, e.source, e.n, *(e.before or ())] for e in entries]
        )
        epoch, last = self.streams.position(group)
        self._send(route, [protocol.FETCHED, req, group, epoch, last, found])

    def status(self) -> dict[str, Any]:
        return {
            "register": self.id,
            "uptime": round(time.monotonic() - self.started, 1),
            "gateways": self.table.gateway_entries(),
            "workers": [e for e in self.table.worker_entries() if e.get("role") != "publisher"],
            "publishers": [e for e in self.table.worker_entries() if e.get("role") == "publisher"],
            "streams": {
                **self.streams.stats(),
                "sends": self.stream_sends,
                "interest_known": len(self.interest),
            },
        }

    def _refused_handshake(self) -> None:
        self.figures.refusals["handshake"] += 1

    def _probe(self) -> None:
        """Sending to a dropped link fails at once (ROUTER_MANDATORY): mark its member."""
        if self.sock.closed:
            return  # a timer set before this register stopped
        now = time.monotonic()
        self.sock.get(zmq.EVENTS)  # let the socket take in pending link changes first
        frame = protocol.pack([protocol.PONG, self.id])
        for routes in (self.gateway_routes, self.worker_routes):
            for member, route in list(routes.items()):
                try:
                    self.sock.send_multipart([route, frame], zmq.NOBLOCK)
                except zmq.ZMQError:
                    log.info("link lost member=%s", member)
                    self.table.link_lost(member, now)
                    del routes[member]

    def _gateways_message(self) -> list[Any]:
        return [protocol.GATEWAYS, self.id, self.settled, self.table.gateway_entries()]

    def _push_if_changed(self) -> None:
        if self.table.version == self._pushed_version:
            return
        self._pushed_version = self.table.version
        frame = protocol.pack(self._gateways_message())
        for route in self.worker_routes.values():
            self._send_frame(route, frame)
        # A send can swallow the edge of ZeroMQ's descriptor: look for input now.
        if self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            self._drain()

    def _send(self, route: bytes, message: list[Any]) -> None:
        self._send_frame(route, protocol.pack(message))

    def _send_frame(self, route: bytes, frame: bytes) -> None:
        out = self._out
        if out is not None:  # inside _drain: leaves with the rest of this batch
            frames = out.get(route)
            if frames is None:
                out[route] = [frame]
            else:
                frames.append(frame)
            return
        try:
            self.sock.send_multipart([route, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("send failed route=%r error=%s", route, exc)
