"""Fencing at the gateway: sessions, refusals, and each command of an event carried out once.

The real command handling (``Commands``) and routing (``WorkerPool``) with the
ZeroMQ socket replaced by a recorder; a worker session is just a routing id.
"""

from __future__ import annotations

from typing import Any

from gateway import protocol as p
from gateway.clients import ClientTable
from gateway.commands import Commands
from gateway.dedup import CHUNK, WINDOW, Seen
from gateway.ids import make
from gateway.workers import WorkerPool
from tests.unit.fakes import FakeConn as Conn
from tests.unit.fakes import FakeSocket as Socket

PREFIX = 7
OTHER = 9


class Gateway:
    def __init__(self) -> None:
        self.sock = Socket()
        self.clients = ClientTable()
        self.pool = WorkerPool(
            self.sock,  # type: ignore[arg-type]
            self.clients,
            max_waiting=100,
            flood_limit=50,
            call_soon=lambda flush: flush(),
        )
        self.commands = Commands(self.clients, self.pool, prefixes=lambda: [PREFIX])
        self.sent: dict[bytes, int] = {}

    def client(self, counter: int) -> Conn:
        conn = Conn(make(PREFIX, counter))
        self.clients.add(conn)  # type: ignore[arg-type]
        return conn

    def recv(self, route: bytes, *messages: list[Any], n: int | None = None) -> None:
        """One message of session ``route``, numbered in order unless ``n`` is given."""
        self.sent[route] = self.sent.get(route, 0) + 1
        head = p.header(self.sent[route] if n is None else n)
        self.commands.handle([route, head, *(p.pack(m) for m in messages)])

    def join(self, route: bytes) -> None:
        self.recv(route, [p.HELLO, route.decode(), {"id": route.decode()}])


def say(conn: Conn, text: str) -> list[Any]:
    return [p.SEND, [conn.client_id], text]


def test_a_session_declared_gone_is_refused_and_its_events_go_on_elsewhere() -> None:
    gw = Gateway()
    gw.join(b"w.1")
    gw.join(b"w.2")
    a = gw.client(1)
    gw.pool.event(a, p.EVENT_MESSAGE, "hi")  # type: ignore[arg-type]
    first = a.worker
    seq = gw.sock.to(first, p.EVENT_MESSAGE)[0][1]
    gw.pool.lost(first, "disconnected")
    second = next(r for r in (b"w.1", b"w.2") if r != first)
    assert [m[1] for m in gw.sock.to(second, p.EVENT_MESSAGE)] == [seq]  # handed over
    # The old session wakes up: its command and its acknowledgement take no effect.
    gw.recv(first, [p.CAUSE, PREFIX, seq, 0], say(a, "late"), [p.ACK, [seq]])
    assert a.frames == [] and seq in gw.pool.workers[second].unacked
    assert gw.sock.to(first, p.FENCED)  # and it is told
    gw.recv(first, [p.HELLO, "w", {}])  # not even a heartbeat brings it back
    assert first not in gw.pool.workers


def test_a_missing_message_ends_the_session() -> None:
    gw = Gateway()
    gw.join(b"w.1")
    gw.recv(b"w.1", [p.HELLO, "w", {}], n=3)  # message 2 never came
    assert b"w.1" not in gw.pool.workers and gw.sock.to(b"w.1", p.FENCED)


def test_a_replayed_event_carries_out_only_what_the_first_run_did_not() -> None:
    gw = Gateway()
    gw.join(b"w.1")
    a = gw.client(1)
    gw.pool.event(a, p.EVENT_MESSAGE, "x")  # type: ignore[arg-type]
    seq = gw.sock.to(b"w.1", p.EVENT_MESSAGE)[0][1]
    gw.recv(b"w.1", [p.CAUSE, PREFIX, seq, 0], say(a, "one"), say(a, "two"))
    gw.pool.lost(b"w.1", "disconnected")  # ... before it acknowledged
    gw.join(b"w.2")  # the event goes to the new session
    assert [m[1] for m in gw.sock.to(b"w.2", p.EVENT_MESSAGE)] == [seq]
    gw.recv(
        b"w.2",
        [p.CAUSE, PREFIX, seq, 0],
        say(a, "one"),
        say(a, "two"),
        [p.JOIN, a.client_id, "room", False, 77],
        [p.ACK, [seq]],
    )
    assert [f[2:] for f in a.frames] == [b"one", b"two"]  # once each
    assert gw.clients.groups_of(a.client_id) == ["room"]
    assert [m[1:] for m in gw.sock.to(b"w.2", p.REPLY)] == [[77, True]]
    assert seq not in gw.pool.effects  # forgotten with the acknowledgement


def test_commands_of_another_gateways_event_are_carried_out_once() -> None:
    gw = Gateway()
    gw.join(b"w.1")
    gw.join(b"w.2")
    a = gw.client(1)
    cause = [p.CAUSE, OTHER, 42, 0]
    gw.recv(b"w.1", cause, say(a, "one"))  # the first run got this far ...
    gw.recv(b"w.2", cause, say(a, "one"), say(a, "two"))  # ... its replay the rest
    gw.recv(b"w.2", [p.CAUSE, "worker-id", 1, 0], say(a, "timer"))  # a worker's own
    gw.recv(b"w.2", [p.CAUSE, "worker-id", 1, 0], say(a, "timer"))  # ... sent again
    assert [f[2:] for f in a.frames] == [b"one", b"two", b"timer"]


def test_a_receipt_is_sent_when_asked_for() -> None:
    gw = Gateway()
    gw.join(b"w.1")
    gw.sent[b"w.1"] = 1
    gw.commands.handle([b"w.1", p.header(2, True), p.pack([p.CAUSE, OTHER, 1, 0])])
    assert [m[1] for m in gw.sock.to(b"w.1", p.RECEIPT)] == [2]


def test_seen_remembers_a_window_of_each_source() -> None:
    seen = Seen()
    assert seen.admit(OTHER, 5, 0) and not seen.admit(OTHER, 5, 0) and seen.admit(OTHER, 5, 1)
    assert seen.admit("w", 5, 0)  # another source
    assert seen.admit(OTHER, 5 + WINDOW + CHUNK, 0)  # much later events push the old out
    assert seen.admit(OTHER, 5, 0)  # too old to tell: carried out (the documented bound)
