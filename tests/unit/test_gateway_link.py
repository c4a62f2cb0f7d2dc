"""GatewayLink against a plain ROUTER socket standing in for the gateway.

What is checked is what the gateway would see: which parts arrive, in one
message or several, and what every caller's future gets from one reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from gateway import link as gw
from gateway import protocol as p


class FakeGateway:
    """A synchronous ROUTER: receive what the link sent, answer its queries."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.asock = self.ctx.socket(zmq.ROUTER)
        self.port = self.asock.bind_to_random_port("tcp://127.0.0.1")
        self.sock = zmq.Socket.shadow(self.asock.underlying)
        self.route = b""
        self.head: list[Any] = []
        """the [MSG, n, ...] header of the last message"""
        self.sent = 0

    def message(self, timeout_ms: int = 2000, causes: bool = False) -> list[list[Any]]:
        """The next multipart message's parts after its header, decoded (raises if none
        comes); CAUSE parts only if ``causes``.

        Blocks the loop: for what must have been sent already, without its help.
        """
        if not self.sock.poll(timeout_ms):
            raise AssertionError(f"nothing arrived in {timeout_ms} ms")
        self.route, head, *parts = self.sock.recv_multipart()
        self.head = p.unpack(head)
        assert self.head[0] == p.MSG
        decoded = [p.unpack(part) for part in parts]
        return [m for m in decoded if causes or m[0] != p.CAUSE]

    async def next_message(self, causes: bool = False) -> list[list[Any]]:
        """The next message, letting the loop run (and the link's flush timers fire)."""
        if not await self.asock.poll(2000):
            raise AssertionError("nothing arrived in 2000 ms")
        return self.message(0, causes)

    def send(self, *messages: list[Any], n: int | None = None) -> None:
        """One numbered message to the link's session (``n``: another number)."""
        self.sent += 1
        head = p.header(self.sent if n is None else n)
        self.sock.send_multipart([self.route, head, *(p.pack(m) for m in messages)])

    def reply(self, req_id: int, result: Any) -> None:
        self.send([p.REPLY, req_id, result])

    def close(self) -> None:
        self.asock.close(linger=0)
        self.ctx.term()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[gw.GatewayLink, FakeGateway]]:
    gateway = FakeGateway()
    ctx = zmq.asyncio.Context()
    link = gw.GatewayLink(
        ctx, "g1", f"tcp://127.0.0.1:{gateway.port}", "w1", lambda link, message: None
    )
    link.start()
    assert (await gateway.next_message())[0][0] == p.HELLO
    try:
        yield link, gateway
    finally:
        link.close()
        ctx.term()
        gateway.close()


async def test_identical_queries_of_one_turn_share_one_request(
    pair: tuple[gw.GatewayLink, FakeGateway],
) -> None:
    link, gateway = pair
    first = link.query(p.Q_GROUP_SESSIONS, "room")
    second = link.query(p.Q_GROUP_SESSIONS, "room")
    other = link.query(p.Q_GROUP_SESSIONS, "lobby")
    link.send_frame(gw.encode_leave(7, "room"), gw.Run(1, 1, link))  # may change the answer
    after = link.query(p.Q_GROUP_SESSIONS, "room")
    sent = await gateway.next_message()
    assert [m[0] for m in sent] == [p.QUERY, p.QUERY, p.LEAVE, p.QUERY]
    assert [m[3] for m in sent if m[0] == p.QUERY] == [["room"], ["lobby"], ["room"]]
    shared_id, other_id, after_id = (m[1] for m in sent if m[0] == p.QUERY)
    gateway.reply(shared_id, [[1, p.EMPTY_SESSION]])
    gateway.reply(other_id, [])
    gateway.reply(after_id, [])
    assert await asyncio.wait_for(first, 2) == [[1, p.EMPTY_SESSION]]
    assert await asyncio.wait_for(second, 2) == [[1, p.EMPTY_SESSION]]
    assert first is not second
    assert await asyncio.wait_for(other, 2) == [] and await asyncio.wait_for(after, 2) == []


async def test_a_cancelled_caller_does_not_cancel_those_sharing_its_request(
    pair: tuple[gw.GatewayLink, FakeGateway],
) -> None:
    link, gateway = pair
    first = link.query(p.Q_COUNT)
    second = link.query(p.Q_COUNT)
    first.cancel()
    (query,) = await gateway.next_message()
    gateway.reply(query[1], 42)
    assert await asyncio.wait_for(second, 2) == 42


async def test_a_closed_link_fails_every_caller_sharing_a_request(
    pair: tuple[gw.GatewayLink, FakeGateway],
) -> None:
    link, _ = pair
    futures = [link.query(p.Q_COUNT) for _ in range(3)]
    link.close()
    for future in futures:
        with pytest.raises(ConnectionError):
            await future


async def test_a_large_batch_leaves_at_the_acknowledgement_not_at_the_end_of_the_turn(
    pair: tuple[gw.GatewayLink, FakeGateway],
) -> None:
    link, gateway = pair
    big = "x" * (gw.FLUSH_AT // 2)
    run = gw.Run(1, 10, link)
    link.send_frame(gw.encode_send([1], big), run)
    link.ack(10, run)  # under the bound: waits for the end of the turn
    link.send_frame(gw.encode_send([2], big), run)
    link.ack(11, run)  # over it: sent now, with both acknowledgements after the commands
    sent = gateway.message()  # without yielding to the loop
    assert [m[0] for m in sent] == [p.SEND, p.SEND, p.ACK]
    assert sent[2][1] == [10, 11]
    link.send_frame(gw.encode_send([3], "small"), run)
    link.ack(12, run)
    with pytest.raises(AssertionError):
        gateway.message(timeout_ms=50)  # a small batch waits for the loop
    assert [m[0] for m in await gateway.next_message()] == [p.SEND, p.ACK]


async def test_an_answered_query_leaves_no_timer_behind(
    pair: tuple[gw.GatewayLink, FakeGateway],
) -> None:
    link, gateway = pair
    futures = [link.query(p.Q_COUNT), link.query(p.Q_COUNT)]  # one request, shared
    (timer,) = link._timeouts.values()
    (query,) = await gateway.next_message()
    gateway.reply(query[1], 3)
    assert [await asyncio.wait_for(f, 2) for f in futures] == [3, 3]
    assert link._timeouts == {} and timer.cancelled()


async def test_a_fenced_session_starts_anew_and_sends_again_only_other_gateways_commands(
    pair: tuple[gw.GatewayLink, FakeGateway],
) -> None:
    link, gateway = pair
    first_route = gateway.route
    own = gw.Run(1, 10, link)  # an event of this gateway
    other = gw.Run(2, 20, None)  # another gateway's event (its link is elsewhere)
    link.send_frame(gw.encode_send([1], "own"), own)
    link.send_frame(gw.encode_send([1], "other"), other)
    sent = await gateway.next_message(causes=True)
    assert gateway.head[2] is True  # other gateways' commands: a receipt is asked for
    assert [m[0] for m in sent] == [p.CAUSE, p.SEND, p.CAUSE, p.SEND]
    gateway.send([p.FENCED], n=0)  # this session was declared gone
    hello = await gateway.next_message()
    assert gateway.route != first_route and hello[0][0] == p.HELLO
    assert gateway.head[1] == 1  # numbering starts again
    again = gateway.message(causes=True)
    assert again == [[p.CAUSE, 2, 20, 0], [p.SEND, [1], "other"]]  # not the stale run's
    assert own.stale and not other.stale
    link.send_frame(gw.encode_send([1], "late"), own)  # nothing of the old run goes out
    link.ack(10, own)
    link.send_frame(gw.encode_send([1], "next"), other)
    assert [m[2] for m in await gateway.next_message()] == ["next"]


async def test_an_ack_waits_for_the_other_gateways_receipt() -> None:
    source, other = FakeGateway(), FakeGateway()
    ctx = zmq.asyncio.Context()
    links = [
        gw.GatewayLink(ctx, gid, f"tcp://127.0.0.1:{g.port}", "w1", lambda link, m: None)
        for gid, g in (("g1", source), ("g2", other))
    ]
    try:
        for link, g in zip(links, (source, other), strict=True):
            link.start()
            await g.next_message()
        run = gw.Run(1, 10, links[0])
        links[1].send_frame(gw.encode_send_all("hi", []), run)  # a broadcast, also there
        assert run.batches
        gw.when_receipted(list(run.batches.values()), lambda: links[0].ack(10, run), 60)
        await other.next_message()
        links[0].send_frame(gw.encode_send([1], "marker"), gw.Run(1, 11, links[0]))
        assert [m[0] for m in await source.next_message()] == [p.SEND]  # no ack yet
        other.send([p.RECEIPT, other.head[1]])
        assert await source.next_message() == [[p.ACK, [10]]]
    finally:
        for link in links:
            link.close()
        ctx.term()
        source.close()
        other.close()
