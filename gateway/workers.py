"""The business workers linked to one gateway, and how client events reach them.

Rules, in the order they are applied to each client event:

1. Ordering: a client is bound to one worker while that worker lives, and its
   events go to it in order. Events wait in a bounded gateway-wide queue while
   no worker is linked (clients stay connected meanwhile; ``max_waiting``,
   10,000 events, beyond which a client whose event does not fit is closed
   with 1013).
2. Nothing accepted is lost: an event stays "unacked" until the worker says it
   was handled. When a worker dies (ZeroMQ drops its link, or it goes silent)
   its unacked events go, in their original order, to the workers that take over
   its clients. Delivery is therefore at least once.
3. A stopping worker says BYE and is sent nothing new; a client still busy on
   it is parked (its new events wait) until its last event there is acked, so
   a rolling restart keeps each client's events in order.
4. Floods: a client with ``flood_limit`` (100) events not yet acknowledged,
   whether sent to a worker (``Route.pending``), waiting for one or parked
   (``Route.queued``), is not read from (TCP backpressure) until half of them
   are; nothing is dropped. So one client cannot fill the waiting queue while
   no worker is linked.
5. Every client has a live worker that knows it: when a worker dies, its idle
   clients are bound to others at once and announced to them (ADOPT), so that
   if this gateway dies too, some worker runs their on_close.
6. Fencing: a worker is known by its session (the routing id ``worker_id.N``
   of one of its sockets). Once a session is declared gone (its link dropped,
   a message of it went missing, or it fell silent) it is refused for good:
   whatever it still sends (a paused process wakes up with its old commands
   queued) is dropped and answered with FENCED, so the events handed to
   others cannot take effect twice. The worker starts a new session.

Everything for one worker leaves in one ZeroMQ message per loop turn (see
``post``): every message wakes libzmq's I/O thread on both ends, which measured
here costs about 40 us of CPU per unbatched round trip against 9 us in tens.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from gateway import protocol
from gateway.metrics import COUNTS
from gateway.pacing import Pacer

if TYPE_CHECKING:
    from gateway.clients import ClientTable
    from gateway.connection import ClientConnection

log = logging.getLogger("gateway.workers")

_PING = protocol.pack([protocol.PING])
_FENCED = protocol.pack([protocol.FENCED])

Item = tuple[int, int, Any]


class Route:
    """Where one client's events go: this module's record on the connection
    (``ClientConnection.route``), written here only."""

    __slots__ = ("pending", "queued", "worker")

    def __init__(self, worker: bytes | None = None) -> None:
        self.worker = worker
        """routing id of the worker this client's events go to"""
        self.pending = 0
        """events sent to it and not yet acknowledged"""
        self.queued = 0
        """events waiting for a worker or parked; with ``pending``, what the flood
        limit counts"""


"""(seq, opcode, payload) of a client event; packed with the current session when sent."""


FENCED_KEPT = 100_000
"""Fenced sessions remembered (a session is refused as long as it is remembered;
the oldest are forgotten first, long after their worker learned of it)."""
REFUSAL_EVERY = 1.0
"""Seconds between two FENCED answers to one session."""


PUBLISHER = "publisher"
"""The HELLO ``role`` of a cluster client outside any worker (``businessworker.cluster``)."""


class WorkerLink:
    """What the gateway knows of one linked worker session."""

    __slots__ = ("draining", "id", "info", "last_seen", "received", "sent", "unacked")

    def __init__(self, worker_id: bytes, info: dict[str, Any]) -> None:
        self.id = worker_id
        self.info = info
        self.last_seen = time.monotonic()
        self.draining = False
        self.unacked: dict[int, tuple[ClientConnection, Item]] = {}
        self.received = 0
        """number of the session's last message handled"""
        self.sent = 0
        """number of our last message to it"""


class WorkerPool:
    """Routes client events to workers; see the module docstring for the rules."""

    def __init__(
        self,
        sock: zmq.Socket,
        clients: ClientTable | None = None,
        *,
        max_waiting: int,
        flood_limit: int,
        on_sent: Callable[[], None] = lambda: None,
        call_soon: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.sock = sock
        self._pacer = Pacer(self.flush)
        self._call_soon = call_soon
        """for unit tests without a loop: run instead of the pacer"""
        self._out: dict[bytes, list[bytes]] = {}
        self.clients = clients
        self.on_sent = on_sent
        self.max_waiting = max_waiting
        self.flood_limit = flood_limit
        self.workers: dict[bytes, WorkerLink] = {}
        self._ring: list[bytes] = []
        self._turn = 0
        self._seq = 0
        self.waiting: deque[tuple[ClientConnection, Item]] = deque()
        self.parked: dict[int, tuple[ClientConnection, list[Item]]] = {}
        self.refused = 0
        """events refused because the waiting queue was full"""
        self.effects: dict[int, int] = {}
        """seq -> commands of that event's run carried out, while it is unacknowledged
        (it travels with a replay: see ``gateway.dedup``)"""
        self.fenced: dict[bytes, float] = {}
        """sessions declared gone -> when we last told them so"""

    @property
    def live(self) -> int:
        return len(self._ring)

    @property
    def busy(self) -> bool:
        """Events still waiting for a worker or for its acknowledgement."""
        return bool(self.waiting or self.parked) or any(w.unacked for w in self.workers.values())

    # Events from clients

    def event(self, conn: ClientConnection, opcode: int, payload: Any = None) -> None:
        self._seq += 1
        self._route(conn, (self._seq, opcode, payload))

    def bind(self, conn: ClientConnection, worker_id: bytes) -> None:
        """Bind a client to a worker before its first event (a parked member: that
        worker knows it already)."""
        route = conn.route
        if route is None:
            conn.route = Route(worker_id)
        else:
            route.worker = worker_id

    def _route(self, conn: ClientConnection, item: Item) -> None:
        route = conn.route
        if route is None:
            route = conn.route = Route()
        if self.waiting:
            self._wait(conn, item)
            return
        parked = self.parked.get(conn.client_id)
        if parked is not None:
            parked[1].append(item)
            self._held(conn)
            return
        worker = self.workers.get(route.worker) if route.worker is not None else None
        if worker is None or worker.draining:
            if worker is not None and route.pending > 0:
                self.parked[conn.client_id] = (conn, [item])
                self._held(conn)
                return
            worker = self._choose()
            if worker is None:
                self._wait(conn, item)
                return
            route.worker = worker.id
        self._send(worker, conn, item)

    def _choose(self) -> WorkerLink | None:
        if not self._ring:
            return None
        self._turn = (self._turn + 1) % len(self._ring)
        return self.workers[self._ring[self._turn]]

    def _send(self, worker: WorkerLink, conn: ClientConnection, item: Item) -> None:
        seq, opcode, payload = item
        message = [opcode, seq, conn.client_id, conn.session_version, conn.session]
        if opcode != protocol.EVENT_CLOSE or payload is not None:
            message.append(payload)
        worker.unacked[seq] = (conn, item)
        route = conn.route
        route.pending += 1
        if route.pending + route.queued == self.flood_limit:
            conn.pause()
        self.post(worker.id, protocol.pack(message))

    # Out: one message per worker per batch (a loop turn, or a millisecond: gateway.pacing)

    def post(self, worker_id: bytes, frame: bytes) -> None:
        """Queue a frame for a worker; what is queued in one batch leaves together."""
        frames = self._out.get(worker_id)
        if frames is not None:
            frames.append(frame)
            return
        first = not self._out
        self._out[worker_id] = [frame]
        if first:
            if self._call_soon is None:
                self._pacer.schedule()
            else:
                self._call_soon(self.flush)

    def flush(self) -> None:
        """Send each worker its queued frames as the parts of one message.

        A worker found unreachable here is lost: its unacknowledged events,
        those just queued included, go to the others (queued for the next turn).
        """
        out, self._out = self._out, {}
        sock = self.sock
        workers = self.workers
        for worker_id, frames in out.items():
            worker = workers.get(worker_id)
            if worker is None:
                continue
            worker.sent += 1
            COUNTS.internal_out += 1
            try:
                sock.send_multipart([worker_id, protocol.header(worker.sent), *frames], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                    raise
                self.lost(worker_id, "unreachable")
        if out:
            self.on_sent()
            if self._call_soon is None:
                self._pacer.sent()

    def _wait(self, conn: ClientConnection, item: Item) -> None:
        if len(self.waiting) >= self.max_waiting and item[1] != protocol.EVENT_CLOSE:
            # Closing is the one honest answer: the client learns it was not
            # served (1013 "try again later") instead of its message vanishing.
            self.refused += 1
            if conn.open:  # once: what it sends while closing is refused quietly
                log.warning("no worker and queue full, closing client=%d", conn.client_id)
                conn.close(1013, "no worker available")
            return
        if not self.waiting:
            log.warning("no worker linked, queueing events")
        self.waiting.append((conn, item))
        self._held(conn)

    def _held(self, conn: ClientConnection) -> None:
        """One more of ``conn``'s events waits or is parked: it counts for the flood limit."""
        route = conn.route
        route.queued += 1
        if route.pending + route.queued == self.flood_limit:
            conn.pause()

    def _release_waiting(self) -> None:
        waiting, self.waiting = self.waiting, deque()
        if waiting:
            log.info("worker available, releasing queued events count=%d", len(waiting))
        for conn, item in waiting:
            conn.route.queued -= 1
            self._route(conn, item)

    # Messages from workers

    def hello(self, worker_id: bytes, info: dict[str, Any], received: int = 1) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            if worker_id in self.fenced:
                return
            worker = WorkerLink(worker_id, info)
            worker.received = received
            self.workers[worker_id] = worker
            if info.get("role") == PUBLISHER:  # sends commands, takes no client events
                log.info("publisher linked publisher=%s", info.get("id", worker_id))
            else:
                self._ring.append(worker_id)
                log.info("worker linked worker=%s", info.get("id", worker_id))
                self._release_waiting()
                self._adopt_orphans()
        worker.last_seen = time.monotonic()

    def bye(self, worker_id: bytes) -> None:
        """A worker is stopping: route nothing new to it, tell it so."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.draining:
            return
        worker.draining = True
        if worker_id in self._ring:
            self._ring.remove(worker_id)
        log.info("worker draining worker=%s unacked=%d", worker.info.get("id"), len(worker.unacked))
        self.post(worker_id, protocol.pack([protocol.BYE_OK]))

    def ack(self, worker_id: bytes, seqs: list[int]) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        worker.last_seen = time.monotonic()
        unacked = worker.unacked
        resume_at = self.flood_limit // 2
        for seq in seqs:
            entry = unacked.pop(seq, None)
            if entry is None:
                continue
            self.effects.pop(seq, None)
            conn = entry[0]
            route = conn.route
            route.pending -= 1
            if route.pending + route.queued == resume_at:
                conn.resume()
            if route.pending == 0 and conn.client_id in self.parked:
                self._unpark(conn.client_id)

    def _unpark(self, client_id: int) -> None:
        conn, items = self.parked.pop(client_id)
        for item in items:
            conn.route.queued -= 1
            self._route(conn, item)

    # Liveness

    def lost(self, worker_id: bytes, why: str) -> None:
        """Fence a gone worker session; hand its unacked events and parked clients to others."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        self.fenced[worker_id] = 0.0
        if len(self.fenced) > FENCED_KEPT:
            del self.fenced[next(iter(self.fenced))]
        self._out.pop(worker_id, None)  # its events are replayed below, not sent to it
        if worker_id in self._ring:
            self._ring.remove(worker_id)
        replay = [entry for _, entry in sorted(worker.unacked.items())]
        if worker.info.get("role") == PUBLISHER:  # takes no events: its going is routine
            log.info("publisher gone publisher=%s why=%s", worker.info.get("id"), why)
        else:
            COUNTS.lost("stopped" if worker.draining else why, len(replay))
            log_level = logging.INFO if worker.draining and not replay else logging.WARNING
            log.log(
                log_level,
                "worker gone worker=%s why=%s replayed=%d",
                worker.info.get("id"),
                why,
                len(replay),
            )
        for conn, _ in replay:
            conn.route.pending -= 1
        orphans = [cid for cid, (conn, _) in self.parked.items() if conn.route.worker == worker_id]
        parked = [self.parked.pop(cid) for cid in orphans]
        for conn, _ in replay:
            conn.route.worker = None
        for conn, item in replay:
            self._route(conn, item)
        for conn, items in parked:
            conn.route.worker = None
            for item in items:
                conn.route.queued -= 1
                self._route(conn, item)
        self._adopt_orphans()

    def _adopt_orphans(self) -> None:
        """Bind every client whose worker is gone to a live one, and tell it."""
        if self.clients is None or not self._ring:
            return
        adopted: dict[bytes, list[list[Any]]] = {}
        for conn in self.clients:
            route = conn.route
            if route is None or route.worker not in self.workers:
                worker = self._choose()
                self.bind(conn, worker.id)
                entry = [conn.client_id, conn.session_version, conn.session]
                adopted.setdefault(worker.id, []).append(entry)
        for worker_id, entries in adopted.items():
            for start in range(0, len(entries), 1000):
                chunk = entries[start : start + 1000]
                self.post(worker_id, protocol.pack([protocol.EVENT_ADOPT, chunk]))

    def refuse(self, worker_id: bytes) -> None:
        """Tell a fenced (or unknown) session it is gone, at most once a REFUSAL_EVERY."""
        now = time.monotonic()
        if now - self.fenced.get(worker_id, 0.0) < REFUSAL_EVERY:
            return
        self.fenced[worker_id] = now
        if len(self.fenced) > FENCED_KEPT:
            del self.fenced[next(iter(self.fenced))]
        try:
            self.sock.send_multipart([worker_id, protocol.UNNUMBERED, _FENCED], zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        self.on_sent()

    def reset(self) -> None:
        """Forget every worker and event: this gateway was declared gone (see Gateway)."""
        for worker_id in list(self.workers):
            self.fenced[worker_id] = 0.0
        self.workers.clear()
        self._ring.clear()
        self._out.clear()
        self.waiting.clear()
        self.parked.clear()
        self.effects.clear()

    def probe(self) -> None:
        """Find links ZeroMQ has dropped: sending to them fails at once."""
        if self.sock.closed:
            return  # a timer set before this gateway stopped
        self.sock.get(zmq.EVENTS)  # let the socket take in pending link changes first
        for worker_id in list(self.workers):
            try:
                self.sock.send_multipart([worker_id, protocol.UNNUMBERED, _PING], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.lost(worker_id, "disconnected")
        self.on_sent()

    def seen(self, worker_id: bytes) -> None:
        """Any message from a worker shows it is alive."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen = time.monotonic()

    def expire(self, now: float) -> None:
        for worker_id, worker in list(self.workers.items()):
            if now - worker.last_seen > protocol.WORKER_EXPIRY:
                self.lost(worker_id, "silent")
