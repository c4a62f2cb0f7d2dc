"""One load-generating process: holds client connections and obeys the parent's commands.

The parent (``bench.harness.LoadPool``) sends ``(req_id, command, kwargs)``
over a pipe; every command runs as a task on this process's uvloop and answers
``(req_id, ok, result)``. Several commands may run at once (a slow-consumer
``resume`` while ``room_send`` still runs).

Message ids: each process sends ids from its own range ``[mid_lo, mid_hi)``;
content is ``"<id>:<monotonic ns>:xxxx..."``. Every receiving connection counts
the ids it got in a bytearray, so loss and duplication are checked per
(message, recipient) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import re
import resource
import time
import traceback
from array import array
from multiprocessing.connection import Connection
from typing import Any

from bench.wsclient import WS, open_ws

monotonic_ns = time.monotonic_ns

SAY = b'{"type":"say"'
LOGIN = b'{"type":"login"'
USER_LIST = b'{"type":"user_list"'
ERROR = b'{"type":"error"'
CONTENT = b'"content":"'
UID_FIELD = re.compile(rb'\{"uid":(\d+),')


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def content_for(mid: int, size: int) -> str:
    head = f"{mid}:{monotonic_ns()}:"
    return head + "x" * max(0, size - len(head))


def say_payload(mid: int, size: int, to: int | str = "all") -> bytes:
    to_json = '"all"' if to == "all" else str(to)
    return (f'{{"type":"say","to_uid":{to_json},"content":"{content_for(mid, size)}"}}').encode()


class LoadProcess:
    def __init__(self, pipe: Connection, index: int) -> None:
        self.pipe = pipe
        self.index = index
        self.loop = asyncio.get_running_loop()
        self.conns: list[WS] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stop = asyncio.Event()
        self.reset_stats()
        # Room traffic
        self.private = False
        self.record_lat = True
        self.mid_lo = 0
        self.mid_hi = 0
        self.pending: dict[int, WS] = {}
        self.on_own: Any = None
        # Logins
        self.logged_in = 0
        self.login_target = 0
        self.login_event = asyncio.Event()
        self.expected_roster = 0
        self.stop_send = False

    def reset_stats(self) -> None:
        self.lat = array("q")
        self.timeline: dict[int, int] = {}
        self.first: array | None = None
        """per message id: latency of its first and last delivery in this process"""
        self.last: array | None = None
        """worst latency per 100 ms of send time (monotonic ns // 1e8)"""
        self.delivered = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.misrouted = 0
        self.self_missing = 0
        self.extra_user_lists = 0
        self.to_target: bytearray | None = None
        self.to_sender: bytearray | None = None

    # Incoming text frames (the hot path)

    def on_text(self, conn: WS, p: bytes) -> None:
        if p.startswith(SAY):
            i = p.find(CONTENT, 25) + 11
            j = p.find(b":", i)
            mid = int(p[i:j])
            if self.private:
                self.delivered += 1
                self._private(conn, p, mid, j)
                return
            counts = conn.counts
            if counts is None:  # not a member being checked (the slow consumer)
                return
            self.delivered += 1
            v = counts[mid]
            if v < 255:
                counts[mid] = v + 1
            if self.record_lat:
                k = p.find(b":", j + 1)
                sent = int(p[j + 1 : k])
                lat = monotonic_ns() - sent
                self.lat.append(lat)
                bucket = sent // 100_000_000
                tl = self.timeline
                if tl.get(bucket, 0) < lat:
                    tl[bucket] = lat
                first = self.first
                if first is not None:
                    f = first[mid]
                    if f == 0 or lat < f:
                        first[mid] = lat
                    if lat > self.last[mid]:
                        self.last[mid] = lat
            if self.mid_lo <= mid < self.mid_hi and self.pending.get(mid) is conn:
                del self.pending[mid]
                if self.on_own is not None:
                    self.on_own()
        elif p.startswith(LOGIN):
            self._login(conn, p)
        elif p.startswith(USER_LIST):
            self._user_list(conn, p)
        elif p.startswith(ERROR):
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(p.decode(errors="replace"))

    def _private(self, conn: WS, p: bytes, mid: int, j: int) -> None:
        # {"type":"say","from_uid":U,"to_uid":V,"content":"mid:ns:..."
        a = p.find(b",", 25)
        sender = int(p[25:a])
        b = p.find(b",", a + 10)
        target = int(p[a + 10 : b])
        uid = conn.uid
        if uid == target:
            self.to_target[mid] += 1
            k = p.find(b":", j + 1)
            self.lat.append(monotonic_ns() - int(p[j + 1 : k]))
        elif uid == sender:
            self.to_sender[mid] += 1
        else:
            self.misrouted += 1

    def on_storm_text(self, conn: WS, p: bytes) -> None:
        """``on_text`` for a login storm: a million login events, checked cheaply."""
        if p.startswith(LOGIN):
            roster = conn.roster
            if conn.uid:
                roster.add(p[22 : p.find(b",", 22)])  # uids kept as their digits
                if len(roster) >= self.expected_roster and not conn.t_done:
                    self._roster_done(conn)
                return
            self._login(conn, p)
        elif p.startswith(USER_LIST):
            self._user_list(conn, p)
        else:
            self.on_text(conn, p)

    def _login(self, conn: WS, p: bytes) -> None:
        # {"type":"login","uid":U,"name":N,...}
        digits = p[22 : p.find(b",", 22)]
        uid = int(digits)
        # a user_list that lacked us: learn our uid from our own login event
        if (
            not conn.uid
            and conn.ctr
            and p.find(b'"name":' + json.dumps(conn.name).encode() + b",") > 0
        ):
            conn.uid = uid
        roster = conn.roster
        if roster is not None:
            roster.add(digits)
            if conn.uid and not conn.t_done and len(roster) >= self.expected_roster:
                self._roster_done(conn)

    def _user_list(self, conn: WS, p: bytes) -> None:
        # {"type":"user_list","user_list":[{"uid":U,"name":N},...]}: the server
        # writes compact JSON, so the fields are found without decoding it all
        conn.ctr += 1  # user_lists received
        if conn.ctr > 1:
            self.extra_user_lists += 1
            return
        uids = UID_FIELD.findall(p)
        me = p.find(b',"name":' + json.dumps(conn.name).encode() + b"}")
        if me > 0:
            conn.uid = int(p[p.rfind(b":", 0, me) + 1 : me])
        else:
            self.self_missing += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(f"user_list of {conn.name} lacks it: {len(uids)} users")
        if conn.roster is not None:
            conn.roster.update(uids)
            if conn.uid and not conn.t_done and len(conn.roster) >= self.expected_roster:
                self._roster_done(conn)
        self.logged_in += 1
        if self.logged_in >= self.login_target:
            self.login_event.set()

    def _roster_done(self, conn: WS) -> None:
        conn.t_done = monotonic_ns()
        self.storm_done += 1
        if self.storm_done >= self.storm_target:
            self.storm_event.set()

    # Command loop

    async def serve(self) -> None:
        self.loop.add_reader(self.pipe.fileno(), self._command)
        # uvloop made the pipe non-blocking; a large reply must not fail with EAGAIN.
        os.set_blocking(self.pipe.fileno(), True)
        await self.stop.wait()

    def _command(self) -> None:
        while self.pipe.poll():
            try:
                req, name, kwargs = self.pipe.recv()
            except EOFError:
                self.stop.set()
                return
            task = self.loop.create_task(self._run(req, name, kwargs))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, req: int, name: str, kwargs: dict[str, Any]) -> None:
        try:
            result = await getattr(self, "cmd_" + name)(**kwargs)
            reply = (req, True, result)
        except BaseException as exc:  # report anything to the parent, never die silently
            reply = (req, False, f"{exc!r}\n{traceback.format_exc()}")
        self.pipe.send(reply)

    # Commands

    async def cmd_exit(self) -> None:
        self.loop.call_later(0.05, self.stop.set)

    async def cmd_ping(self) -> int:
        return os.getpid()

    async def cmd_connect(
        self,
        targets: list[tuple[str, int]],
        count: int,
        sources: list[str],
        concurrency: int = 200,
        rcvbuf: dict[int, int] | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Open ``count`` more connections, spread over targets and source addresses."""
        rcvbuf = rcvbuf or {}
        base = len(self.conns)
        conns: list[WS | None] = [None] * count
        failures: list[str] = []
        sem = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()

        async def one(i: int) -> None:
            idx = base + i
            host, port = targets[i % len(targets)]
            source = sources[(i // len(targets)) % len(sources)] if sources else None
            async with sem:
                try:
                    conns[i] = await open_ws(
                        self.loop,
                        idx,
                        host,
                        port,
                        source,
                        self.on_text,
                        rcvbuf=rcvbuf.get(i),
                        timeout=timeout,
                    )
                except Exception as exc:
                    failures.append(repr(exc))

        await asyncio.gather(*(one(i) for i in range(count)))
        self.conns.extend(c for c in conns if c is not None)
        return {
            "opened": count - len(failures),
            "failed": len(failures),
            "failures": failures[:3],
            "seconds": time.monotonic() - t0,
            "total": len(self.conns),
        }

    async def cmd_alive(self) -> dict[str, int]:
        return {
            "open": sum(1 for c in self.conns if not c.lost),
            "lost": sum(1 for c in self.conns if c.lost),
        }

    async def cmd_close_all(self, abort: bool = True) -> int:
        n = len(self.conns)
        for c in self.conns:
            if abort:
                c.abort()
            else:
                c.close()
        self.conns = []
        await asyncio.sleep(0.05)
        return n

    async def cmd_login(
        self, names: list[str], rooms: list[str], concurrency: int = 100, timeout: float = 60.0
    ) -> list[int]:
        """Log every connection in (in order); return their uids."""
        conns = self.conns
        self.login_target = len(conns)
        self.logged_in = 0
        self.login_event.clear()
        deadline = time.monotonic() + timeout
        for sent, (c, name, room) in enumerate(zip(conns, names, rooms, strict=True)):
            c.name = name
            while sent - self.logged_in >= concurrency:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"logins: {self.logged_in}/{len(conns)}")
                await asyncio.sleep(0.005)
            c.send_text(json.dumps({"type": "login", "name": name, "room": room}).encode())
        if self.logged_in < len(conns):
            try:
                await asyncio.wait_for(
                    self.login_event.wait(), max(0.1, deadline - time.monotonic())
                )
            except TimeoutError:
                raise TimeoutError(self._login_state() + await self._probe_stuck()) from None
        # a user_list that lacked us: our own login event (which follows) gives our uid
        while any(not c.uid for c in conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if any(not c.uid for c in conns):
            raise TimeoutError(self._login_state())
        return [c.uid for c in conns]

    async def _probe_stuck(self) -> str:
        """Clients whose login got no user_list: does a second message get an answer?

        A second login must be refused (already_logged_in) once the first was handled;
        no answer at all means the client's first event is still pending somewhere.
        """
        stuck = [c for c in self.conns if not c.ctr and not c.lost]
        partial = [
            (len(c.data), c.data[:12].hex()) for c in stuck if c.data
        ]  # bytes of an incomplete frame kept by our parser
        before = self.errors
        for c in stuck:
            c.send_text(b'{"type":"login","name":"' + c.name.encode() + b'"}')
        await asyncio.sleep(3)
        late = sum(1 for c in stuck if c.ctr)
        return (
            f"; probe: a second login from {len(stuck)} stuck clients got "
            f"{self.errors - before} errors and {late} late user_lists in 3 s; "
            f"{len(partial)} of them held a partial frame {partial[:3]}"
        )

    def _login_state(self) -> str:
        conns = self.conns
        return (
            f"logins: {sum(1 for c in conns if c.ctr)} of {len(conns)} got a user_list, "
            f"{sum(1 for c in conns if c.uid)} know their uid, {self.self_missing} user_lists "
            f"lacked their own user, {self.extra_user_lists} extra user_lists, {self.errors} "
            f"errors {self.error_samples[:2]}, {sum(1 for c in conns if c.lost)} connections lost"
        )

    async def cmd_storm_prepare(self, names: list[str], expected: int) -> int:
        for c, name in zip(self.conns, names, strict=True):
            c.name = name
            c.on_text = self.on_storm_text
            c.roster = set()
            c.t_done = 0
            c.ctr = 0
        self.expected_roster = expected
        self.storm_done = 0
        self.storm_target = len(self.conns)
        self.storm_event = asyncio.Event()
        self.login_target = len(self.conns)
        self.logged_in = 0
        self.login_event.clear()
        self.reset_stats()
        return len(self.conns)

    async def cmd_storm_go(self, room: str, timeout: float) -> dict[str, Any]:
        t0 = monotonic_ns()
        for c in self.conns:
            c.send_text(json.dumps({"type": "login", "name": c.name, "room": room}).encode())
        t_sent = monotonic_ns()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.storm_event.wait(), timeout)
        done = [c.t_done for c in self.conns if c.t_done]
        return {
            "t0": t0,
            "t_sent": t_sent,
            "done": len(done),
            "clients": len(self.conns),
            "t_last": max(done) if done else 0,
            "t_user_lists": self.logged_in,
            "t_list": [c.t_done - t0 for c in self.conns if c.t_done],
            "rosters": sorted(len(c.roster) for c in self.conns)[:3],
            "errors": self.errors,
            "error_samples": self.error_samples,
            "self_missing": self.self_missing,
            "extra_user_lists": self.extra_user_lists,
        }

    async def cmd_prepare_room(self, members: bool, slots: int, record_lat: bool = True) -> None:
        """Give every connection a fresh count array of ``slots`` message ids."""
        self.reset_stats()
        self.private = False
        self.record_lat = record_lat
        self.pending = {}
        for c in self.conns:
            c.counts = bytearray(slots) if members else None
            c.roster = None
        if record_lat:
            self.first = array("q", bytes(8 * slots))
            self.last = array("q", bytes(8 * slots))

    async def cmd_room_send(
        self,
        mid_lo: int,
        mid_hi: int,
        rate: float,
        duration: float,
        content_size: int,
        senders: list[int],
        start_at: float | None = None,
        phase: float = 0.0,
    ) -> dict[str, Any]:
        """Say to the room at ``rate`` per second from ``senders`` (indexes), until duration."""
        return await self._paced(
            mid_lo, mid_hi, rate, duration, content_size, senders, "all", start_at, phase
        )

    async def cmd_private_send(
        self,
        mid_lo: int,
        mid_hi: int,
        rate: float,
        duration: float,
        content_size: int,
        peers: list[list[int]],
        slots: int,
        start_at: float | None = None,
        phase: float = 0.0,
    ) -> dict[str, Any]:
        """Each send: a random connection says privately to a random other of its room."""
        self.reset_stats()
        self.private = True
        self.to_target = bytearray(slots)
        self.to_sender = bytearray(slots)
        for c in self.conns:
            c.counts = None
        return await self._paced(
            mid_lo, mid_hi, rate, duration, content_size, None, peers, start_at, phase
        )

    async def _paced(
        self,
        mid_lo: int,
        mid_hi: int,
        rate: float,
        duration: float,
        content_size: int,
        senders: list[int] | None,
        to: Any,
        start_at: float | None = None,
        phase: float = 0.0,
    ) -> dict[str, Any]:
        if senders is not None and not senders:
            return {"sent": 0, "mid_lo": mid_lo, "mid_end": mid_lo, "seconds": 0.0}
        rng = random.Random(self.index)
        conns = self.conns
        self.stop_send = False
        pick = itertools.cycle(senders if senders is not None else range(len(conns)))
        self.mid_lo, self.mid_hi = mid_lo, mid_hi
        mid = mid_lo
        # Processes share a start time and each is offset by its phase, so that their
        # sends interleave evenly instead of leaving in bursts of one per process.
        t0 = (start_at + phase) if start_at is not None else time.monotonic()
        delay = t0 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        end = t0 + duration
        sent = 0
        while True:
            now = time.monotonic()
            if now >= end or mid >= mid_hi or self.stop_send:
                break
            due = min(int((now - t0) * rate) + 1 - sent, mid_hi - mid)
            for _ in range(due):
                i = next(pick)
                if to == "all":
                    conns[i].send_text(say_payload(mid, content_size))
                else:
                    others = to[i]
                    target = others[rng.randrange(len(others))]
                    conns[i].send_text(say_payload(mid, content_size, target))
                mid += 1
                sent += 1
            await asyncio.sleep(max(0.0005, t0 + sent / rate - time.monotonic()))
        return {"sent": sent, "mid_lo": mid_lo, "mid_end": mid, "seconds": time.monotonic() - t0}

    async def cmd_room_flood(
        self,
        mid_lo: int,
        mid_hi: int,
        window: int,
        duration: float,
        content_size: int,
        senders: list[int],
    ) -> dict[str, Any]:
        """Keep ``window`` says outstanding (sent and not yet back at their sender)."""
        conns = self.conns
        pick = itertools.cycle(senders)
        self.mid_lo, self.mid_hi = mid_lo, mid_hi
        self.pending = {}
        state = {"mid": mid_lo}
        done = asyncio.Event()
        t0 = time.monotonic()
        end = t0 + duration

        def send_one() -> None:
            mid = state["mid"]
            if mid >= mid_hi or time.monotonic() >= end:
                if not self.pending:
                    done.set()
                return
            c = conns[next(pick)]
            self.pending[mid] = c
            c.send_text(say_payload(mid, content_size))
            state["mid"] = mid + 1

        self.on_own = send_one
        for _ in range(window):
            send_one()
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), max(0.01, end - time.monotonic()))
            except TimeoutError:
                if time.monotonic() >= end + 10:  # outstanding says never came back
                    break
                if not self.pending:
                    break
        self.on_own = None
        t1 = time.monotonic()
        return {
            "sent": state["mid"] - mid_lo,
            "mid_lo": mid_lo,
            "mid_end": state["mid"],
            "seconds": t1 - t0,
            "unanswered": len(self.pending),
        }

    async def cmd_stop_send(self) -> None:
        """End a running room_send/private_send now."""
        self.stop_send = True

    async def cmd_progress(self) -> dict[str, int]:
        return {"delivered": self.delivered, "errors": self.errors}

    async def cmd_verify_room(
        self, ranges: list[tuple[int, int]], skip: list[int] | None = None
    ) -> dict[str, Any]:
        """Per (message, member): lost = count 0, duplicated = count > 1."""
        skip_set = set(skip or ())
        lost = dup = members = 0
        examples: list[str] = []
        for c in self.conns:
            counts = c.counts
            if counts is None or c.idx in skip_set:
                continue
            members += 1
            for lo, hi in ranges:
                seg = counts[lo:hi]
                zero = seg.count(0)
                one = seg.count(1)
                lost += zero
                dup += len(seg) - zero - one
                if zero and len(examples) < 3:
                    examples.append(f"conn {c.idx} uid {c.uid} missed {zero} of [{lo},{hi})")
        return {"lost": lost, "duplicated": dup, "members": members, "examples": examples}

    async def cmd_private_counts(self) -> dict[str, Any]:
        return {
            "to_target": bytes(self.to_target or b""),
            "to_sender": bytes(self.to_sender or b""),
            "misrouted": self.misrouted,
        }

    async def cmd_latencies(self) -> bytes:
        data = self.lat.tobytes()
        self.lat = array("q")
        return data

    async def cmd_spread(self) -> tuple[bytes, bytes]:
        """Per message id, this process's first and last delivery latency (0: none)."""
        if self.first is None:
            return b"", b""
        return self.first.tobytes(), self.last.tobytes()

    async def cmd_timeline(self) -> dict[int, int]:
        tl, self.timeline = self.timeline, {}
        return tl

    async def cmd_errors(self) -> dict[str, Any]:
        return {"errors": self.errors, "samples": self.error_samples}

    # Slow consumer

    async def cmd_slow(self, idx: int) -> int:
        """Stop reading one connection (its SO_RCVBUF was made small at connect)."""
        conn = self._by_idx(idx)
        conn.counts = None
        conn.transport.pause_reading()
        return conn.uid

    async def cmd_tcp_state(self, idx: int) -> int:
        import socket
        import struct

        conn = self._by_idx(idx)
        sock = conn.transport.get_extra_info("socket")
        if sock is None or conn.lost:
            return 7  # TCP_CLOSE
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        except OSError:
            return 7
        return struct.unpack("B", info[:1])[0]

    async def cmd_resume(self, idx: int, timeout: float = 5.0) -> dict[str, Any]:
        """Read again; wait for the close frame or the end of the connection."""
        conn = self._by_idx(idx)
        t0 = time.monotonic()
        if not conn.lost:
            conn.closed = self.loop.create_future()
            conn.transport.resume_reading()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.closed), timeout)
        return {
            "close_code": conn.close_code,
            "lost": conn.lost,
            "seconds": time.monotonic() - t0,
        }

    def _by_idx(self, idx: int) -> WS:
        for c in self.conns:
            if c.idx == idx:
                return c
        raise KeyError(idx)

    # Handshakes

    async def cmd_handshakes(
        self,
        targets: list[tuple[str, int]],
        sources: list[str],
        concurrency: int,
        duration: float,
        max_count: int,
    ) -> dict[str, Any]:
        """Connect, upgrade, close (closing handshake), in ``concurrency`` loops.

        No timer per connection (it would cost the client more than the server
        pays): the loops as a whole get ``duration`` + 10 s, and a connection
        still unfinished then counts as failed.
        """
        state = {"ok": 0, "failed": 0, "n": 0}
        codes: dict[int | None, int] = {}
        failures: list[str] = []
        per_target = [0] * len(targets)
        src = itertools.cycle(sources)
        t0 = time.monotonic()
        end = t0 + duration

        async def loop_(k: int) -> None:
            ti = k % len(targets)
            while time.monotonic() < end and state["n"] < max_count:
                state["n"] += 1
                host, port = targets[ti]
                try:
                    conn = await open_ws(
                        self.loop, -1, host, port, next(src), self.on_text, timeout=None
                    )
                    conn.closed = self.loop.create_future()
                    conn.close()
                    await conn.closed
                    codes[conn.close_code] = codes.get(conn.close_code, 0) + 1
                    state["ok"] += 1
                    per_target[ti] += 1
                except Exception as exc:
                    state["failed"] += 1
                    if len(failures) < 3:
                        failures.append(repr(exc))
                ti = (ti + 1) % len(targets)

        loops = [asyncio.ensure_future(loop_(k)) for k in range(concurrency)]
        _, stuck = await asyncio.wait(loops, timeout=duration + 10)
        for task in stuck:
            task.cancel()
            state["failed"] += 1
            if len(failures) < 3:
                failures.append("a connection did not finish in 10 s")
        return {
            "ok": state["ok"],
            "failed": state["failed"],
            "failures": failures,
            "codes": {str(k): v for k, v in codes.items()},
            "per_target": per_target,
            "seconds": time.monotonic() - t0,
        }


def main(pipe: Connection, index: int, cpus: list[int] | None) -> None:
    """Entry point of a load process (multiprocessing target)."""
    import uvloop

    if cpus:
        os.sched_setaffinity(0, cpus)
    raise_nofile()
    gc.set_threshold(5000, 10, 10)  # as the gateway does: fewer collections per connection

    async def run() -> None:
        proc = LoadProcess(pipe, index)
        await proc.serve()

    uvloop.run(run())
