"""The small client that speaks the gateway's protocol: one worker's link to one gateway.

The link runs in *sessions* (``gateway.protocol``): one DEALER socket each,
whose routing id ``worker_id.N`` names it. Commands are tagged with the run of
the client event that caused them (``Run``), so that the gateway carries out
each at most once per place in the run. When the gateway fences the session
(it declared this worker gone and handed its events to others), or a message
of the gateway's went missing, the link starts a new session: what it held for
runs of this gateway's events is dropped, and commands it had sent for runs of
other gateways' events that the gateway had not confirmed are sent again.

A run that sent commands to gateways other than its event's own is
acknowledged only once those gateways confirmed them (RECEIPT): until then the
event's gateway keeps it, so a worker that dies in between loses nothing.

Commands are encoded by the module-level ``encode_*`` functions, so that a
command meant for every gateway (a broadcast) is packed once and the same
bytes are sent down every link. Everything queued in one loop turn leaves as the
parts of one ZeroMQ message, acknowledgements last: one wake-up of libzmq's I/O
thread per turn instead of one per command. (Unlike the gateway's side, this
side is not paced: see ``gateway.pacing``.)

Identical queries queued in one turn with no command between them share one
request: the gateway handles a message's parts in order, so it would have given
each the same answer. A login storm's thousand "who is in the room?" cost one
reply instead of a thousand (each of a thousand sessions).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from chatcluster import auth, links
from chatcluster.keys import Keys
from chatcluster.metrics import Histogram
from gateway import protocol as p
from gateway.zmqreader import BatchReader

log = logging.getLogger("gateway.link")

BATCH = 2000
FLUSH_AT = 1 << 20
"""Bytes queued after which a handled event's acknowledgement sends the batch
at once: a worker busy with a storm of events lets the gateway start writing
instead of waiting for the whole loop turn."""


class LinkCounts:
    """What every link of this process sent and got (``businessworker.metrics`` reads it):
    plain counters, one addition per command, query or ZeroMQ message."""

    __slots__ = (
        "commands",
        "queries",
        "query_seconds",
        "query_timeouts",
        "received",
        "resets",
        "sent",
    )

    def __init__(self) -> None:
        self.commands = 0
        self.queries = 0
        self.query_timeouts = 0
        self.query_seconds = Histogram()
        self.sent = 0
        self.received = 0
        self.resets = 0


COUNTS = LinkCounts()

QUERY_TIMEOUT = 15.0
"""A gateway busy with a storm of work may take seconds to answer; it is not gone."""

Data = str | bytes


def encode_send(client_ids: list[int], data: Data) -> bytes:
    return p.pack([p.SEND, client_ids, data])


def encode_send_all(data: Data, exclude: list[int]) -> bytes:
    return p.pack([p.SEND_ALL, data, exclude])


def encode_send_group(groups: list[str], data: Data, exclude: list[int]) -> bytes:
    return p.pack([p.SEND_GROUP, groups, data, exclude])


def encode_publish_group(
    group: str, data: Data, exclude: list[int], count: int, seconds: float
) -> bytes:
    return p.pack([p.PUBLISH_GROUP, group, data, exclude, count, seconds])


def encode_send_uid(uids: list[str], data: Data) -> bytes:
    return p.pack([p.SEND_UID, uids, data])


def encode_close(client_id: int, data: Data | None, code: int) -> bytes:
    return p.pack([p.CLOSE, client_id, data, code])


def encode_leave(client_id: int, group: str) -> bytes:
    return p.pack([p.LEAVE, client_id, group])


def encode_ungroup(group: str) -> bytes:
    return p.pack([p.UNGROUP, group])


def encode_bind_uid(client_id: int, uid: str) -> bytes:
    return p.pack([p.BIND_UID, client_id, uid])


def encode_unbind_uid(client_id: int, uid: str) -> bytes:
    return p.pack([p.UNBIND_UID, client_id, uid])


def encode_keep(client_id: int, secret: str, grace: float) -> bytes:
    return p.pack([p.KEEP, client_id, secret, grace])


def encode_park(
    client_id: int,
    version: int,
    packed_session: bytes,
    groups: list[str],
    uid: str | None,
    secret: str,
    grace: float,
) -> bytes:
    return p.pack([p.PARK, client_id, version, packed_session, groups, uid, secret, grace])


def encode_set_session(client_id: int, packed_session: bytes) -> bytes:
    return p.pack([p.SET_SESSION, client_id, packed_session])


def encode_update_session(client_id: int, packed_changes: bytes) -> bytes:
    return p.pack([p.UPDATE_SESSION, client_id, packed_changes])


EventHandler = Callable[["GatewayLink", list[Any]], None]


class Run:
    """One run of a client event's callback (or a worker's own turn), as its commands say.

    ``source`` is the event's gateway's id prefix (an int), or the worker's id
    for commands no event caused; ``seq`` the event's number there. ``link`` is
    the link the event came on and ``session`` that link's session then: once
    the link is in another session the run is stale, and nothing of it goes out.
    """

    __slots__ = ("batches", "counts", "link", "seq", "session", "source")

    def __init__(self, source: int | str, seq: int, link: GatewayLink | None) -> None:
        self.source = source
        self.seq = seq
        self.link = link
        self.session = 0 if link is None else link.session
        self.counts: dict[GatewayLink, int] = {}
        """commands sent per link: the index of the next one there"""
        self.batches: dict[GatewayLink, Batch] | None = None
        """per other gateway's link, the last batch carrying commands of ours"""

    @property
    def stale(self) -> bool:
        link = self.link
        return link is not None and link.session != self.session

    def cause(self, link: GatewayLink) -> bytes:
        return p.pack([p.CAUSE, self.source, self.seq, self.counts.get(link, 0)])


class Batch:
    """The commands of one message kept for sending again, until the gateway confirms them."""

    __slots__ = ("groups", "n", "receipted", "waiters")

    def __init__(self) -> None:
        self.n = 0
        self.receipted = False
        self.groups: list[tuple[Run, int, list[bytes]]] = []
        """(run, index of its first command here, the commands)"""
        self.waiters: list[Callable[[], None]] = []

    def done(self) -> None:
        self.receipted = True
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter()


def when_receipted(batches: list[Batch], then: Callable[[], None], timeout: float) -> None:
    """Call ``then`` once every batch was confirmed (at once if they all are), or after
    ``timeout`` s: a gateway that does not confirm that long is cut off from us, and
    holding the acknowledgement longer would stall the event's client for as long
    (its commands stay kept, and are sent again once the gateway is back)."""
    pending = [b for b in batches if not b.receipted]
    if not pending:
        then()
        return
    left = [len(pending)]
    timer: list[asyncio.TimerHandle] = []

    def one() -> None:
        left[0] -= 1
        if left[0] == 0:
            timer[0].cancel()
            then()

    def late() -> None:
        if left[0] > 0:
            left[0] = -1
            then()

    timer.append(asyncio.get_running_loop().call_later(timeout, late))
    for batch in pending:
        batch.waiters.append(one)


class GatewayLink:
    """A session socket to one gateway: commands and queries out, client events in."""

    _req_ids = itertools.count(1)
    _sessions = itertools.count(1)
    """session numbers, unique in the process: a routing id is never used twice, even
    towards a gateway that comes back under another id at the same address"""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        gateway_id: str,
        address: str,
        worker_id: str,
        on_event: EventHandler,
        keys: Keys | None = None,
        *,
        hello: Callable[[GatewayLink], list[Any]] | None = None,
        on_reset: Callable[[GatewayLink], None] | None = None,
        guard: Callable[[], bool] | None = None,
        link_timeout: float = links.LINK_TIMEOUT,
    ) -> None:
        self.gateway_id = gateway_id
        self.address = address
        self.worker_id = worker_id
        self.on_event = on_event
        self.ctx = ctx
        self.keys = keys
        self.link_timeout = link_timeout
        self._hello = hello or (lambda link: [p.HELLO, worker_id, {"id": worker_id}])
        self._on_reset = on_reset
        self._guard = guard
        """called before each send: True when the worker found its loop frozen (and
        started new sessions everywhere), so that nothing held goes out"""
        self.session = 0
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._timeouts: dict[int, asyncio.TimerHandle] = {}
        """cancelled with the answer: a timer left pending keeps its request's
        objects alive for QUERY_TIMEOUT, and at thousands of queries a second the
        collector then traverses tens of thousands of them (full collections of
        30-110 ms were measured in the worker, the private messages' p99)"""
        self._sharers: dict[int, list[asyncio.Future[Any]]] = {}
        """req_id -> the futures of later callers who share that request"""
        self._asked: dict[tuple[Any, ...], int] = {}
        """(kind, *args) -> req_id of the queries queued since the last command"""
        self._asked_at: dict[int, float] = {}
        """req_id of a query -> when it was asked (loop time), for its latency"""
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._acks: list[int] = []
        self._run: Run | None = None
        """the run whose CAUSE the message being built last named"""
        self._batch = Batch()
        """what of the message being built is kept until confirmed (other gateways'
        runs and the worker's own)"""
        self._unreceipted: list[Batch] = []
        self._flush_scheduled = False
        self._bye_ok: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending_resend: list[Batch] = []
        self._open()

    def _open(self) -> None:
        """A new session: a new socket, a new routing id, numbering from 1."""
        self.session = next(self._sessions)
        asock = self._asock = self.ctx.socket(zmq.DEALER)
        asock.setsockopt(zmq.ROUTING_ID, f"{self.worker_id}.{self.session}".encode())
        asock.setsockopt(zmq.LINGER, 2000)
        links.unbounded(asock)
        asock.setsockopt(zmq.RECONNECT_IVL, 100)
        asock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        links.heartbeats(asock, self.link_timeout)
        if self.keys is not None:
            self.keys.client(asock)
        self._watcher = auth.ClientWatch(
            asock, f"gateway {self.gateway_id} {self.address}", self.keys is not None
        )
        asock.connect(self.address)
        self._reader = BatchReader(asock, self._drain)
        self._sock = self._reader.sock
        self._sent = 0
        self._received = 0

    def start(self) -> None:
        self._send([p.pack(self._hello(self))])
        self._task = asyncio.create_task(self._reader.run())

    def _shut(self, linger: int) -> None:
        self._watcher.close()
        self._reader.stop()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._asock.close(linger=linger)

    def close(self) -> None:
        self.flush()
        self._shut(1000)
        if self._bye_ok is not None and not self._bye_ok.done():
            self._bye_ok.set_result(None)  # the gateway is gone: nothing more will come
        self._fail_requests()
        for batch in [*self._unreceipted, self._batch]:
            batch.done()  # nobody left to confirm them: do not hold acknowledgements back

    def _fail_requests(self) -> None:
        for req_id in list(self._replies):
            self._settle(req_id, exc=ConnectionError(f"link to gateway {self.gateway_id} closed"))

    # Sessions

    def reset(self, why: str) -> None:
        """Start a new session; see the module docstring for what is kept."""
        log.warning(
            "new session with gateway=%s why=%s session=%d", self.gateway_id, why, self.session + 1
        )
        self.begin_reset()
        self.finish_reset()

    def begin_reset(self) -> None:
        """Drop the session: after this, runs of this gateway's events are stale."""
        COUNTS.resets += 1
        self._shut(0)
        kept = [*self._unreceipted]
        if self._batch.groups:
            kept.append(self._batch)
        self._pending_resend = kept
        self._unreceipted = []
        self._batch = Batch()
        self._out, self._out_bytes, self._acks, self._run = [], 0, [], None
        self._asked.clear()
        self._open()  # the new session number: every run of the old one is stale now
        self._fail_requests()
        if self._on_reset is not None:
            self._on_reset(self)

    def finish_reset(self) -> None:
        """HELLO on the new session, then what other gateways' runs still need sent."""
        self.start()
        for batch in self._pending_resend:
            groups = [g for g in batch.groups if not g[0].stale]
            if not groups:
                batch.done()
                continue
            frames = []
            for run, first, commands in groups:
                frames.append(p.pack([p.CAUSE, run.source, run.seq, first]))
                frames.extend(commands)
            batch.groups = groups
            self._send(frames, batch)
        self._pending_resend = []

    # Out

    def control(self, frame: bytes) -> None:
        """Queue a frame that is no command of a run (HELLO, BYE)."""
        self._queue(frame)

    def send_frame(self, frame: bytes, run: Run) -> None:
        """Queue an encoded command of ``run``; it leaves at the end of this loop turn."""
        if run.link is not None and run.link.session != run.session:
            return  # its event was handed to another worker: nothing of it may act
        self._asked.clear()  # a query after it may get another answer
        counts = run.counts
        index = counts.get(self, 0)
        counts[self] = index + 1
        if run.link is not self:
            batch = self._batch
            groups = batch.groups
            if groups and groups[-1][0] is run:
                groups[-1][2].append(frame)
            else:
                groups.append((run, index, [frame]))
            if run.batches is None:
                run.batches = {}
            run.batches[self] = batch
        if run is not self._run:
            self._run = run
            self._out.append(p.pack([p.CAUSE, run.source, run.seq, index]))
        COUNTS.commands += 1
        self._queue(frame)

    def _queue(self, frame: bytes) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._flush_soon()

    def ack(self, seq: int, run: Run) -> None:
        """Acknowledge a handled event, after the commands its handler queued."""
        if run.stale:
            return
        self._acks.append(seq)
        if self._out_bytes >= FLUSH_AT:
            self.flush()
        else:
            self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what was queued, as one message (an event's commands and its
        acknowledgement arrive together or not at all)."""
        self._flush_scheduled = False
        if self._guard is not None and self._guard():
            return  # frozen: every session was started anew, nothing held may go
        self._asked.clear()
        out, self._out = self._out, []
        self._out_bytes = 0
        self._run = None
        if self._acks:
            out.append(p.pack([p.ACK, self._acks]))
            self._acks = []
        if not out:
            return
        batch = self._batch
        if batch.groups:
            self._batch = Batch()
            self._send(out, batch)
        else:
            self._send(out)

    def _send(self, frames: list[bytes], batch: Batch | None = None) -> None:
        if self._sock.closed:
            return
        self._sent += 1
        COUNTS.sent += 1
        if batch is not None:
            batch.n = self._sent
            self._unreceipted.append(batch)
        self._sock.send_multipart([p.header(self._sent, batch is not None), *frames], zmq.NOBLOCK)
        self._reader.sent()

    def _receipt(self, n: int) -> None:
        unreceipted = self._unreceipted
        done = 0
        while done < len(unreceipted) and unreceipted[done].n <= n:
            done += 1
        if done:
            confirmed, self._unreceipted = unreceipted[:done], unreceipted[done:]
            for batch in confirmed:
                batch.done()

    def join(
        self, client_id: int, group: str, hold: bool, run: Run, since: list[Any] | None = None
    ) -> asyncio.Future[Any]:
        """Join a client to a group; ``since`` (a history group): [] or [epoch, offset]."""
        req_id = next(self._req_ids)
        future = self._expect(req_id)
        message = [p.JOIN, client_id, group, hold, req_id]
        if since is not None:
            message.append(since)
        self.send_frame(p.pack(message), run)
        return future

    def query(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        """Ask the gateway; each caller gets its own future (cancel it freely).

        Callers who share a request get the same answer object: read it, do not
        change it.
        """
        key = (kind, *args)
        req_id = self._asked.get(key)
        if req_id is not None:
            future = asyncio.get_running_loop().create_future()
            self._sharers.setdefault(req_id, []).append(future)
            return future
        req_id = next(self._req_ids)
        future = self._expect(req_id)
        COUNTS.queries += 1
        self._asked_at[req_id] = asyncio.get_running_loop().time()
        self._queue(p.pack([p.QUERY, req_id, kind, list(args)]))
        self._asked[key] = req_id
        return future

    def bye(self) -> asyncio.Future[None]:
        """Ask the gateway to route nothing new here; resolves when it agreed."""
        self._bye_ok = asyncio.get_running_loop().create_future()
        self._asked.clear()
        self.control(p.pack([p.BYE]))
        return self._bye_ok

    def _expect(self, req_id: int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._replies[req_id] = future
        self._timeouts[req_id] = loop.call_later(QUERY_TIMEOUT, self._time_out, req_id)
        return future

    def _time_out(self, req_id: int) -> None:
        if req_id in self._replies:
            if req_id in self._asked_at:
                COUNTS.query_timeouts += 1
            self._settle(
                req_id,
                exc=TimeoutError(f"gateway {self.gateway_id} did not answer in {QUERY_TIMEOUT} s"),
            )

    def _settle(self, req_id: int, result: Any = None, exc: BaseException | None = None) -> None:
        """Resolve a request's future and those of whoever shares it."""
        timer = self._timeouts.pop(req_id, None)
        if timer is not None:
            timer.cancel()
        asked = self._asked_at.pop(req_id, None)
        if asked is not None and exc is None:
            COUNTS.query_seconds.observe(asyncio.get_running_loop().time() - asked)
        futures = [self._replies.pop(req_id, None), *self._sharers.pop(req_id, ())]
        for future in futures:
            if future is not None and not future.done():
                if exc is None:
                    future.set_result(result)
                else:
                    future.set_exception(exc)

    # In

    def _drain(self) -> bool:
        sock = self._sock
        session = self.session
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            try:
                head = p.unpack(frames[0])
                n = head[1] if head[0] == p.MSG else -1
            except (ValueError, IndexError, TypeError):
                n = -1
            COUNTS.received += 1
            if n != 0:
                if n != self._received + 1:
                    self.reset(f"message {self._received + 1} of the gateway went missing")
                    return False
                self._received = n
            for frame in frames[1:]:
                self._handle(frame)
                if self.session != session:  # fenced: the rest is of the old session
                    return False
        return True

    def _handle(self, frame: bytes) -> None:
        try:
            message = p.unpack(frame)
        except ValueError as exc:
            log.warning("bad message from gateway=%s error=%r", self.gateway_id, exc)
            return
        op = message[0]
        if op == p.REPLY:
            self._settle(message[1], message[2])
        elif op == p.RECEIPT:
            self._receipt(message[1])
        elif op == p.FENCED:
            self.reset("the gateway declared this session gone")
        elif op == p.BYE_OK:
            if self._bye_ok is not None and not self._bye_ok.done():
                self._bye_ok.set_result(None)
        elif op != p.PING:
            try:
                self.on_event(self, message)
            except Exception:
                log.exception("event handling failed gateway=%s", self.gateway_id)
