"""The gateway's side of group streams: publishing, delivery in order, recovery.

A history group's messages do not go from a worker to every gateway: the worker
hands them to one gateway (PUBLISH_GROUP), which passes them on to the stream
register (``register.streams``) on a socket of its own; the register numbers
them and sends each to every gateway, which writes it to its members. So every
member sees one order, and the register keeps what a returning client missed.

- A publish stays here until it comes back from the register, and is sent again
  (in order) while it does not; the register takes each gateway's publishes in
  order, once.
- Messages of a group are delivered in offset order: a gap (a message lost on a
  reconnect) is filled from the register's history before anything after it.
- Members that opted in (a join with ``since``) get each message with its
  position spliced in (``"epoch"`` and ``"offset"`` before the closing brace of
  a JSON object); the others get the message as it was sent, byte for byte.
- A join with ``since`` = (epoch, offset) asks the register for everything
  after it and becomes a member only once that arrived: the missed messages
  come first, in order, then the live ones, none twice. All or nothing: if the
  register cannot serve all of them (another epoch, bounds exceeded) the client
  joins without them and the join's answer says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from chatcluster import auth, links
from chatcluster.keys import Keys
from gateway.connection import text_frame
from gateway.metrics import COUNTS
from gateway.zmqreader import BatchReader
from register import protocol as rp

if TYPE_CHECKING:
    from gateway.clients import ClientTable
    from gateway.connection import ClientConnection

log = logging.getLogger("gateway.streams")

RESEND = 1.0
"""Seconds an unconfirmed publish waits before it (and those after it) are sent again."""
RETAIN = 5.0
"""Seconds a confirmed publish is kept, to be sent again should its register have died
before every gateway had it (a new epoch)."""
MAX_UNCONFIRMED = 100_000
"""Publishes kept for sending again; beyond this the oldest is dropped, with a WARNING."""


def positioned(data: str | bytes, epoch: str, offset: int) -> str | bytes:
    """``data`` with its stream position, if it is a JSON object; else unchanged."""
    if data.__class__ is not str or not data.endswith("}") or not data.startswith("{"):
        return data
    tail = f'"epoch":"{epoch}","offset":{offset}}}'
    body = data[:-1].rstrip()
    return body + ("," if len(body) > 1 else "") + tail


@dataclass(slots=True)
class GroupState:
    epoch: str = ""
    offset: int = 0
    """last offset delivered here"""
    waiting: list[list[Any]] | None = None
    """while a gap is being filled, the messages that came after it"""
    before: tuple[str, int] | None = None
    """(epoch, offset) reached under the register that sequenced before this one"""


@dataclass(slots=True)
class Resume:
    conn: ClientConnection
    group: str
    since: list[Any]
    reply: Callable[[Any], None]
    timer: asyncio.TimerHandle | None = None


class StreamLink:
    """This gateway's stream socket to the stream register, and delivery of streams."""

    def __init__(
        self,
        clients: ClientTable,
        addresses: list[str],
        gateway_id: Callable[[], str],
        *,
        ctx: zmq.asyncio.Context | None = None,
        keys: Keys | None = None,
        link_timeout: float = links.LINK_TIMEOUT,
    ) -> None:
        self.clients = clients
        self.addresses = addresses
        self.gateway_id = gateway_id
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.keys = keys
        self.link_timeout = link_timeout
        self.groups: dict[str, GroupState] = {}
        self.positioned: dict[str, set[int]] = {}
        """group -> client ids here that get positions"""
        self.floors: dict[tuple[str, int], int] = {}
        """(group, client id) -> offset up to which a resumed client had the replay"""
        self.taken: dict[str, int] = {}
        """source gateway id -> its last publish delivered here (repeats across epochs)"""
        self._n = 0
        self._source = ""
        self._unconfirmed: dict[int, list[Any]] = {}
        self._epoch = ""
        """the epoch of the register that sequenced the last stream message"""
        self._retained: deque[tuple[float, int, list[Any]]] = deque()
        """(when confirmed, n, message) of the last RETAIN seconds' publishes"""
        self._sent_at = 0.0
        self._fetches: dict[int, Callable[[list[Any]], None]] = {}
        self._req = itertools.count(1)
        self._socks: list[zmq.Socket] = []
        self._readers: list[BatchReader] = []
        self._heard: list[float] = []
        """when each register last sent us anything (it answers every STREAMS beat)"""
        self._epochs: list[str] = []
        """each register's epoch, as its answers to our beats say"""
        self._watches: list[auth.ClientWatch] = []
        self._out: dict[int, list[bytes]] = {}
        """register index -> frames queued in this loop turn"""
        self._interest: dict[str, bool] = {}
        """groups that got their first member here (True) or lost their last (False)
        in this loop turn, for the registers (interest routing)"""
        clients.watch = self._watch

    # Interest: the register sends a group's messages only to gateways with members

    def _watch(self, group: str, present: bool) -> None:
        if not self._interest:
            with contextlib.suppress(RuntimeError):  # no loop: a unit test's table
                asyncio.get_running_loop().call_soon(self._send_interest)
        self._interest[group] = present
        if not present:
            state = self.groups.get(group)
            if state is not None and state.waiting is None:
                del self.groups[group]  # nobody here to keep the order for

    def _send_interest(self) -> None:
        changes, self._interest = self._interest, {}
        added = [g for g, present in changes.items() if present]
        removed = [g for g, present in changes.items() if not present]
        frame = rp.pack([rp.INTEREST, self.gateway_id(), False, added, removed])
        for i in range(len(self._socks)):
            self._send(frame, i)

    def _send_all_interest(self, i: int) -> None:
        groups = list(self.clients.groups)
        self._send(rp.pack([rp.INTEREST, self.gateway_id(), True, groups, []]), i)

    # Publishing

    def publish(
        self, group: str, data: str | bytes, exclude: list[int], count: int, seconds: float
    ) -> None:
        source = self.gateway_id()
        if source != self._source:  # a new gateway id: a new numbering
            self._source, self._n = source, 0
            self._unconfirmed.clear()
        self._n += 1
        if not self._unconfirmed:
            self._sent_at = time.monotonic()
        message = [rp.PUBLISH, source, self._n, 0, group, data, exclude, count, seconds]
        self._unconfirmed[self._n] = message
        if len(self._unconfirmed) > MAX_UNCONFIRMED:
            del self._unconfirmed[next(iter(self._unconfirmed))]
            log.warning("stream register unreachable: dropped an unconfirmed publish")
        self._send_publish(message)

    def _send_publish(self, message: list[Any]) -> None:
        # With the first publish still unconfirmed, so that a register that never
        # heard of us (it restarted) knows where our numbering resumes.
        message[3] = next(iter(self._unconfirmed))
        self._send(rp.pack(message))

    def _confirmed(self, n: int, epoch: str = "", offset: int = 0) -> None:
        """Our publish n came back at (epoch, offset): kept a while as confirmed, with
        where it was, for a register that takes over (``_new_epoch``)."""
        unconfirmed = self._unconfirmed
        now = time.monotonic()
        retained = self._retained
        while unconfirmed:
            first = next(iter(unconfirmed))
            if first > n:
                break
            message = unconfirmed.pop(first)
            if first == n and epoch:
                message = [*message[:9], epoch, offset]
            retained.append((now, first, message))
        while retained and (retained[0][0] < now - RETAIN or len(retained) > MAX_UNCONFIRMED):
            retained.popleft()
        self._sent_at = now

    def _sequencer(self, epoch: str) -> None:
        """Note which register sequences (its id: a stream's epoch is ``id.k``); if
        another than before, ``_new_epoch``."""
        epoch = epoch.partition(".")[0]
        before, self._epoch = self._epoch, epoch
        if before and before != epoch:
            self._new_epoch()

    def _new_epoch(self) -> None:
        """The register restarted: what it had sent shortly before it went may not have
        reached every gateway, so the publishes it confirmed lately go to the new one
        too (gateways that had them drop the repeats: ``taken``)."""
        again = {n: message for _, n, message in self._retained}
        self._retained.clear()
        again.update(self._unconfirmed)
        self._unconfirmed = again
        self._sent_at = 0.0
        self._resend()

    def _resend(self) -> None:
        if self._unconfirmed and time.monotonic() - self._sent_at >= RESEND:
            self._sent_at = time.monotonic()
            for message in list(self._unconfirmed.values()):
                self._send_publish(message)

    # Joining

    def join(
        self,
        conn: ClientConnection,
        group: str,
        since: list[Any],
        reply: Callable[[Any], None],
    ) -> None:
        """Join a client that wants positions; with (epoch, offset), after what it missed.

        From now (``since`` empty) on a group this gateway knows no position of,
        the register is asked where the group stands, as for a resume: a member
        whose gateway had not seen the group yet would otherwise start from
        ("", 0), from which nothing can be recovered.
        """
        self.positioned.setdefault(group, set()).add(conn.client_id)
        if len(since) != 2 and group in self.groups:
            self.clients.join(conn, group)
            reply(self._answer(group, True, 0))
            return
        resume = Resume(conn, group, since, reply)
        req = next(self._req)
        resume.timer = asyncio.get_running_loop().call_later(
            self.link_timeout, self._resume_timed_out, req, resume
        )
        self._fetches[req] = lambda m: self._resumed(resume, m)
        epoch, offset = since if len(since) == 2 else ("", -1)
        self._send(rp.pack([rp.FETCH, req, group, epoch, offset]), self._register_of(epoch))

    def _resumed(self, resume: Resume, m: list[Any]) -> None:
        if resume.timer is not None:
            resume.timer.cancel()
        conn, group = resume.conn, resume.group
        if self.clients.get(conn.client_id) is not conn:
            resume.reply(False)
            return
        epoch, last, entries = m[3], m[4], m[5]
        missed = 0
        if entries is not None:
            for offset, data, exclude, _source, _n in entries:
                if conn.client_id not in exclude:
                    frame = positioned(data, epoch, offset)
                    encoded = text_frame(frame, binary=frame.__class__ is bytes)
                    conn.write(encoded)
                    COUNTS.delivered(1, encoded)
                missed += 1
        # What the register had sent before this answer may not all be delivered here
        # yet (a gap being filled): this client had it in the replay.
        self.floors[(group, conn.client_id)] = last
        if epoch and group not in self.groups:
            # What follows the answer is checked against it: a message lost on the
            # way is a gap to fill, not a new start.
            self.groups[group] = GroupState(epoch, last)
        self.clients.join(conn, group)
        answer = self._answer(group, entries is not None or not resume.since, missed)
        if epoch:  # the register's position of the stream, which the replay reached
            answer["epoch"], answer["offset"] = epoch, last
        resume.reply(answer)

    def _resume_timed_out(self, req: int, resume: Resume) -> None:
        if self._fetches.pop(req, None) is None:
            return
        log.warning("the stream register did not answer a recovery in time group=%s", resume.group)
        if self.clients.get(resume.conn.client_id) is resume.conn:
            self.clients.join(resume.conn, resume.group)
            resume.reply(self._answer(resume.group, False, 0))
        else:
            resume.reply(False)

    def _answer(self, group: str, recovered: bool, missed: int) -> dict[str, Any]:
        state = self.groups.get(group)
        return {
            "recovered": recovered,
            "missed": missed,
            "epoch": state.epoch if state else "",
            "offset": state.offset if state else 0,
        }

    def forget(self, conn: ClientConnection) -> None:
        """A client is going: it gets no more positions."""
        for group in self.clients.groups_of(conn.client_id):
            self.leave(conn, group)

    def leave(self, conn: ClientConnection, group: str) -> None:
        ids = self.positioned.get(group)
        if ids is not None:
            ids.discard(conn.client_id)
            if not ids:
                del self.positioned[group]
        self.floors.pop((group, conn.client_id), None)

    # Delivery

    def _stream(self, m: list[Any]) -> None:
        epoch, group, offset, data, exclude, source, n = m[1:8]
        self._sequencer(epoch)
        if source == self._source:
            self._confirmed(n, epoch, offset)
        state = self.groups.get(group)
        if state is None:
            state = self.groups[group] = GroupState(epoch, offset - 1)
            if len(m) > 9:  # sequenced before, when nobody here was a member: not theirs
                state.offset = offset
                self.taken[source] = max(self.taken.get(source, 0), n)
                return
        if state.waiting is not None:
            state.waiting.append(m)
            return
        if state.epoch != epoch:
            # Another register sequences now (it restarted, or another took over): its
            # stream starts at 1, and what we missed of it is fetched like any gap.
            state.before = (state.epoch, state.offset)
            state.epoch, state.offset = epoch, 0
        if offset <= state.offset:
            return
        if offset > state.offset + 1:
            self._fill(group, state, [m])
            return
        if len(m) > 9 and not self._missed(state, source, n, m[8], m[9]):
            state.offset = offset
            return
        self._deliver(group, state, epoch, offset, data, exclude, source, n)

    def _missed(self, state: GroupState, source: str, n: int, epoch: str, offset: int) -> bool:
        """A publish its source sent again after the register that had sequenced it at
        (epoch, offset) went: ours only if we were behind that position then (that
        register died before sending it here), not if our members joined after it."""
        behind = state.before if state.before is not None else (state.epoch, state.offset)
        if behind[0] != epoch or behind[1] >= offset:
            self.taken[source] = max(self.taken.get(source, 0), n)
            return False
        self.taken[source] = min(self.taken.get(source, 0), n - 1)
        return True

    def _fill(self, group: str, state: GroupState, waiting: list[list[Any]]) -> None:
        """Fetch what is missing after ``state.offset``; ``waiting`` is delivered after it."""
        state.waiting = waiting
        req = next(self._req)
        self._fetches[req] = lambda f: self._gap_filled(group, f)
        asyncio.get_running_loop().call_later(self.link_timeout, self._gap_timed_out, req)
        self._send(
            rp.pack([rp.FETCH, req, group, state.epoch, state.offset]),
            self._register_of(state.epoch),
        )

    def _positions(self, positions: list[list[Any]]) -> None:
        """Where the register's streams stand: catch up on what we missed of them."""
        for group, epoch, last in positions:
            state = self.groups.get(group)
            if state is None or state.waiting is not None:
                continue
            if state.epoch != epoch:
                state.before = (state.epoch, state.offset)
                state.epoch, state.offset = epoch, 0
            if last > state.offset:
                self._fill(group, state, [])

    def _gap_timed_out(self, req: int) -> None:
        done = self._fetches.pop(req, None)
        if done is not None:  # the register went away: go on without what it had
            done([rp.FETCHED, req, "", "", 0, None])

    def _gap_filled(self, group: str, m: list[Any]) -> None:
        state = self.groups[group]
        waiting, state.waiting = state.waiting or [], None
        epoch, last, entries = m[3], m[4], m[5]
        if entries is None:
            log.warning(
                "a gap in a stream could not be filled from the register group=%s after=%d",
                group,
                state.offset,
            )
            state.offset = waiting[0][3] - 1 if waiting else last
        else:
            for offset, data, exclude, source, n, *before in entries:
                if source == self._source:
                    self._confirmed(n, epoch, offset)
                if offset <= state.offset:
                    continue
                if before and not self._missed(state, source, n, before[0], before[1]):
                    state.offset = offset
                    continue
                self._deliver(group, state, epoch, offset, data, exclude, source, n)
        for later in waiting:
            self._stream(later)

    def _deliver(
        self,
        group: str,
        state: GroupState,
        epoch: str,
        offset: int,
        data: str | bytes,
        exclude: list[int],
        source: str,
        n: int,
    ) -> None:
        state.offset = offset
        if n <= self.taken.get(source, 0):
            return  # taken by an earlier register too: its members had it
        self.taken[source] = n
        members = self.clients.members(group)
        if not members:
            if state.waiting is None:
                del self.groups[group]  # nobody here to keep the order for
            return
        frame = text_frame(data, binary=data.__class__ is bytes)
        pos = self.positioned.get(group)
        pframe = (
            text_frame(positioned(data, epoch, offset), binary=data.__class__ is bytes)
            if pos
            else frame
        )
        skip = set(exclude) if exclude else ()
        if not pos:
            for cid, conn in list(members.items()):
                if cid not in skip:
                    conn.write(frame)
            COUNTS.delivered(len(members) - sum(1 for cid in skip if cid in members), frame)
            return
        floors = self.floors
        plain = positioned_sent = 0
        for cid, conn in list(members.items()):
            if cid in skip:
                continue
            if cid in pos:
                if floors:
                    floor = floors.get((group, cid))
                    if floor is not None:
                        if offset <= floor:
                            continue
                        del floors[(group, cid)]
                conn.write(pframe)
                positioned_sent += 1
            else:
                conn.write(frame)
                plain += 1
        COUNTS.delivered(plain, frame)
        COUNTS.delivered(positioned_sent, pframe)

    @property
    def unconfirmed(self) -> int:
        """Publishes handed to the register and not yet confirmed by it."""
        return len(self._unconfirmed)

    # The sockets: one per register; publishes go to the first that answers

    @property
    def active(self) -> int:
        """The register that sequences: the first of the list that answered lately."""
        now = time.monotonic()
        for i, heard in enumerate(self._heard):
            if now - heard < self.link_timeout:
                return i
        return 0

    def _register_of(self, epoch: str) -> int | None:
        """The register whose stream ``epoch`` is, if it answers; else the active one."""
        now = time.monotonic()
        for i, (known, heard) in enumerate(zip(self._epochs, self._heard, strict=True)):
            if known == epoch and now - heard < self.link_timeout:
                return i
        return None

    def _send(self, frame: bytes, to: int | None = None) -> None:
        """Queue a frame for a register; a loop turn's frames leave as one message."""
        if not self._socks:
            return
        i = self.active if to is None else to
        out = self._out
        if not out:
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:  # no loop (a unit test): at once
                out[i] = [frame]
                self._flush()
                return
        frames = out.get(i)
        if frames is None:
            out[i] = [frame]
        else:
            frames.append(frame)

    def _flush(self) -> None:
        out, self._out = self._out, {}
        for i, frames in out.items():
            if i >= len(self._socks):
                continue
            with contextlib.suppress(zmq.Again):
                self._socks[i].send_multipart(frames, zmq.NOBLOCK)
            self._readers[i].sent()  # the send may have swallowed the input's edge

    async def run(self) -> None:
        asocks = []
        for i, address in enumerate(self.addresses):
            asock = self.ctx.socket(zmq.DEALER)
            asock.setsockopt(zmq.LINGER, 0)
            asock.setsockopt(zmq.RECONNECT_IVL, 100)
            asock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            links.unbounded(asock)
            links.heartbeats(asock, self.link_timeout)
            if self.keys is not None:
                self.keys.client(asock)
            self._watches.append(
                auth.ClientWatch(asock, f"register {address} (streams)", self.keys is not None)
            )
            asock.connect(address)
            asocks.append(asock)
            reader = BatchReader(asock, lambda i=i: self._drain(i))
            self._readers.append(reader)
            self._socks.append(reader.sock)
            self._heard.append(0.0)
            self._epochs.append("")
        readers = [asyncio.ensure_future(r.run()) for r in self._readers]
        active = 0
        try:
            while True:
                beat = rp.pack([rp.STREAMS, self.gateway_id()])
                for i in range(len(self._socks)):
                    self._send(beat, i)
                if self.active != active:
                    active = self.active
                    log.info("stream register register=%s", self.addresses[active])
                    self._sent_at = 0.0  # send what is unconfirmed there at once
                self._resend()
                await asyncio.sleep(rp.HEARTBEAT / 2)
        finally:
            for task in readers:
                task.cancel()
            for reader in self._readers:
                reader.stop()
            self._readers.clear()
            self._socks.clear()
            for watch in self._watches:
                watch.close()
            self._watches.clear()
            for asock in asocks:
                asock.close(linger=0)

    def _drain(self, i: int) -> bool:
        sock = self._socks[i]
        for _ in range(2000):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            self._heard[i] = time.monotonic()
            try:
                m = rp.unpack(frame)
                if m[0] == rp.STREAM:
                    self._stream(m)
                elif m[0] == rp.STREAMS:
                    self._epochs[i] = m[1]
                    if len(m) > 2 and not m[2]:  # it does not know our groups
                        self._send_all_interest(i)
                    if i == self.active:
                        self._sequencer(m[1])
                elif m[0] == rp.POSITIONS:
                    self._positions(m[1])
                elif m[0] == rp.FETCHED:
                    done = self._fetches.pop(m[1], None)
                    if done is not None:
                        done(m)
            except Exception as exc:  # one bad message must not stop the stream
                log.warning("bad stream message error=%r", exc)
        return True
