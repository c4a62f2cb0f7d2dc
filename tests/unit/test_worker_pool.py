"""The gateway's routing of client events to workers, with a fake socket and fake clients."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gateway import protocol as p
from gateway.workers import PUBLISHER, WorkerPool
from tests.unit.fakes import FakeConn, FakeSocket


def make_pool(**kwargs: Any) -> tuple[WorkerPool, FakeSocket]:
    sock = FakeSocket()
    pool = WorkerPool(
        sock,  # type: ignore[arg-type]
        max_waiting=kwargs.get("max_waiting", 100),
        flood_limit=kwargs.get("flood_limit", 4),
        call_soon=lambda flush: flush(),  # no loop here: every frame leaves at once
    )
    return pool, sock


def seqs(events: list[list[Any]]) -> list[int]:
    return [e[1] for e in events]


def test_a_client_sticks_to_one_worker_and_clients_spread() -> None:
    pool, sock = make_pool()
    pool.hello(b"w1", {})
    pool.hello(b"w2", {})
    a, b = FakeConn(1), FakeConn(2)
    for _ in range(3):
        pool.event(a, p.EVENT_MESSAGE, "x")
        pool.event(b, p.EVENT_MESSAGE, "y")
    routes = {cid: {r for r, m in sock.sent if m[2] == cid} for cid in (1, 2)}
    assert len(routes[1]) == 1 and len(routes[2]) == 1
    assert routes[1] != routes[2]


def test_events_wait_for_a_worker_in_order() -> None:
    pool, sock = make_pool()
    a = FakeConn(1)
    for i in range(3):
        pool.event(a, p.EVENT_MESSAGE, str(i))
    assert sock.sent == [] and len(pool.waiting) == 3
    pool.hello(b"w1", {})
    assert [e[5] for e in sock.events()] == ["0", "1", "2"]


def test_a_full_waiting_queue_closes_the_client_with_1013() -> None:
    pool, _ = make_pool(max_waiting=2)
    a, b = FakeConn(1), FakeConn(2)
    pool.event(a, p.EVENT_MESSAGE, "1")
    pool.event(a, p.EVENT_MESSAGE, "2")
    pool.event(b, p.EVENT_MESSAGE, "3")
    assert b.closed_with == 1013 and pool.refused == 1
    pool.event(b, p.EVENT_CLOSE)  # a close event is never refused
    assert len(pool.waiting) == 3


def test_a_dead_workers_unacked_events_go_to_another_in_order() -> None:
    pool, sock = make_pool(flood_limit=100)
    pool.hello(b"w1", {})
    a = FakeConn(1)
    for i in range(5):
        pool.event(a, p.EVENT_MESSAGE, str(i))
    first = a.worker
    pool.ack(first, seqs(sock.events(first))[:2])
    assert a.pending == 3
    pool.hello(b"w2", {})
    pool.lost(first, "test")
    replayed = sock.events(b"w2")
    assert [e[5] for e in replayed] == ["2", "3", "4"]
    assert a.worker == b"w2" and a.pending == 3


def test_sending_to_a_vanished_worker_fails_over_at_once() -> None:
    pool, sock = make_pool()
    pool.hello(b"w1", {})
    pool.hello(b"w2", {})
    a = FakeConn(1)
    pool.event(a, p.EVENT_MESSAGE, "0")
    sock.gone.add(a.worker)
    dead = a.worker
    pool.event(a, p.EVENT_MESSAGE, "1")
    assert dead not in pool.workers
    assert [e[5] for e in sock.events(a.worker)] == ["0", "1"]


def test_a_draining_worker_finishes_a_clients_events_before_it_moves() -> None:
    pool, sock = make_pool(flood_limit=100)
    pool.hello(b"w1", {})
    a = FakeConn(1)
    pool.event(a, p.EVENT_MESSAGE, "0")
    pool.hello(b"w2", {})
    pool.bye(b"w1")
    assert [m[0] for r, m in sock.sent if r == b"w1"][-1] == p.BYE_OK
    pool.event(a, p.EVENT_MESSAGE, "1")  # parked: "0" is still being handled by w1
    assert sock.events(b"w2") == []
    pool.ack(b"w1", seqs(sock.events(b"w1")))
    assert [e[5] for e in sock.events(b"w2")] == ["1"]
    # New clients never go to the draining worker.
    b = FakeConn(2)
    pool.event(b, p.EVENT_MESSAGE, "x")
    assert b.worker == b"w2"


def test_a_flooding_client_is_paused_then_resumed() -> None:
    pool, sock = make_pool(flood_limit=4)
    pool.hello(b"w1", {})
    a = FakeConn(1)
    for i in range(4):
        pool.event(a, p.EVENT_MESSAGE, str(i))
    assert a.paused
    pool.ack(b"w1", seqs(sock.events())[:2])
    assert not a.paused


def test_events_waiting_or_parked_count_for_the_flood_limit() -> None:
    """With no worker, one client cannot fill the waiting queue: it is paused at its limit."""
    pool, sock = make_pool(flood_limit=4, max_waiting=100)
    a = FakeConn(1)
    for i in range(4):
        pool.event(a, p.EVENT_MESSAGE, str(i))
    assert a.paused and a.queued == 4 and a.pending == 0
    pool.hello(b"w1", {})  # released: they are now sent, and still count
    assert a.queued == 0 and a.pending == 4 and a.paused
    pool.hello(b"w2", {})
    pool.bye(b"w1")
    pool.ack(b"w1", seqs(sock.events(b"w1"))[:2])  # half acked: read again
    assert not a.paused
    for i in range(4, 6):  # parked behind the two still on the draining worker
        pool.event(a, p.EVENT_MESSAGE, str(i))
    assert a.paused and a.pending == 2 and a.queued == 2
    pool.ack(b"w1", seqs(sock.events(b"w1"))[2:])
    assert a.queued == 0 and a.pending == 2
    assert [e[5] for e in sock.events(b"w2")] == ["4", "5"]


def test_events_are_packed_with_the_session_current_when_sent() -> None:
    pool, sock = make_pool()
    a = FakeConn(1)
    pool.event(a, p.EVENT_MESSAGE, "x")  # waits: no worker
    a.session, a.session_version = p.pack_session({"name": "n"}), 1
    pool.hello(b"w1", {})
    event = sock.events()[0]
    assert event[3] == 1 and p.unpack_session(event[4]) == {"name": "n"}


def test_a_silent_worker_expires() -> None:
    pool, _ = make_pool()
    pool.hello(b"w1", {})
    pool.expire(now=pool.workers[b"w1"].last_seen + p.WORKER_EXPIRY + 1)
    assert pool.workers == {}


def test_a_publisher_going_is_routine(caplog: pytest.LogCaptureFixture) -> None:
    """A publisher (a web app's Cluster, a command-line send) takes no events: its link
    dropping is logged at INFO and not counted as a worker lost."""
    from gateway.metrics import COUNTS

    pool, _ = make_pool()
    pool.hello(b"w1", {"id": "w1"})
    pool.hello(b"p1", {"id": "p1", "role": PUBLISHER})
    before = sum(COUNTS.workers_lost.values())
    with caplog.at_level(logging.INFO, logger="gateway.workers"):
        pool.lost(b"p1", "disconnected")
    assert [r.levelno for r in caplog.records] == [logging.INFO], caplog.text
    assert "publisher gone publisher=p1" in caplog.text
    assert sum(COUNTS.workers_lost.values()) == before
    assert pool.live == 1
