"""The stream core (register/streams.py) and the position splice, without sockets."""

from __future__ import annotations

import json
from typing import Any

from gateway.clients import ClientTable
from gateway.streams import StreamLink, positioned
from register import protocol as rp
from register.streams import Entry, Streams


def publish(
    s: Streams,
    source: str,
    n: int,
    first: int | None = None,
    *,
    now: float = 0.0,
    seconds: float = 60.0,
) -> Entry | None:
    """The n-th publish of gateway ``source`` to group "g", which keeps 5 messages."""
    data = f"{source}{n}"
    return s.publish(source, n, n if first is None else first, "g", data, [], 5, seconds, now)


def test_offsets_follow_the_order_taken_across_gateways() -> None:
    s = Streams("E")
    entries = [publish(s, "a", 1), publish(s, "b", 1), publish(s, "a", 2)]
    assert [e.offset for e in entries if e is not None] == [1, 2, 3]
    assert s.position("g") == ("E.1", 3)


def test_a_repeat_is_dropped_and_one_after_a_gap_waits_for_the_resend() -> None:
    s = Streams("E")
    assert publish(s, "a", 1) is not None
    assert publish(s, "a", 1) is None  # sent again: taken already
    assert publish(s, "a", 3, first=2) is None  # 2 was lost: 3 waits
    assert publish(s, "a", 2, first=2) is not None
    assert publish(s, "a", 3, first=2) is not None
    assert s.position("g") == ("E.1", 3)


def test_a_new_register_resumes_a_gateway_at_its_first_unconfirmed() -> None:
    s = Streams("E2")
    assert publish(s, "a", 9, first=7) is None  # 7 and 8 come again first
    assert publish(s, "a", 7, first=7) is not None
    assert publish(s, "a", 8, first=7) is not None
    assert publish(s, "a", 9, first=7) is not None


def test_since_is_all_or_nothing() -> None:
    s = Streams("E")
    for n in range(1, 9):  # 8 messages, 5 kept: offsets 4..8
        publish(s, "a", n)
    assert [e.offset for e in s.since("g", "E.1", 3, 0.0) or []] == [4, 5, 6, 7, 8]
    assert s.since("g", "E.1", 2, 0.0) is None  # offset 3 is gone: nothing, not a part
    assert s.since("g", "E.1", 8, 0.0) == []
    assert s.since("g", "E.1", 9, 0.0) is None  # never given
    assert s.since("g", "other", 7, 0.0) is None  # another register's epoch
    assert s.since("unknown", "E.1", 0, 0.0) is None


def test_messages_older_than_the_bound_are_let_go() -> None:
    s = Streams("E")
    publish(s, "a", 1, now=0.0, seconds=10.0)
    publish(s, "a", 2, now=8.0, seconds=10.0)
    assert [e.offset for e in s.since("g", "E.1", 1, 9.0) or []] == [2]
    assert s.since("g", "E.1", 0, 12.0) is None  # offset 1 aged out
    assert s.stats() == {"groups": 1, "messages": 1, "bytes": 2}
    s.expire(100.0)  # every message aged out: the stream is forgotten
    assert s.stats()["groups"] == 0
    assert publish(s, "a", 3) is not None and s.position("g") == ("E.2", 1)


def test_positions_are_added_to_json_objects_only() -> None:
    out = positioned('{"type":"say","content":"}"}', "E", 7)
    assert json.loads(out) == {"type": "say", "content": "}", "epoch": "E", "offset": 7}
    assert json.loads(positioned("{}", "E", 1)) == {"epoch": "E", "offset": 1}
    assert positioned("plain text", "E", 1) == "plain text"
    assert positioned(b"{}", "E", 1) == b"{}"


class Member:
    """A stand-in for a client connection: what the stream link writes to it."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.groups: set[str] | None = None
        self.uid = None
        self.frames: list[bytes] = []

    def write(self, frame: bytes) -> None:
        self.frames.append(frame)


def stream(epoch: str, offset: int, source: str, n: int, *before: Any) -> list[Any]:
    return [rp.STREAM, epoch, "g", offset, f"{source}{n}", [], source, n, *before]


def test_a_publish_sent_again_after_a_register_change_reaches_only_who_missed_it() -> None:
    """Register R0 sequenced a1 at (R0, 1) and died; gateway a sends it to R1 again.
    A gateway that had it, or whose member joined after it, drops it; one that was
    behind that position (R0 died before sending it there) delivers it."""
    for had, joined_after, expect in ((True, False, 0), (False, True, 0), (False, False, 1)):
        table = ClientTable()
        link = StreamLink(table, [], lambda: "b")
        if not joined_after:
            member = Member(1)
            table.join(member, "g")  # type: ignore[arg-type]
            link._stream(stream("R0", 1, "c", 1))  # position (R0, 1) reached here
            if had:
                link._stream(stream("R0", 2, "a", 1))
            before = len(member.frames)
        else:
            link._stream(stream("R0", 1, "c", 1))  # nobody here: the order is not kept
            member = Member(1)
            table.join(member, "g")  # type: ignore[arg-type]
            before = 0
        link._stream(stream("R1", 1, "a", 1, "R0", 2))
        link._stream(stream("R1", 2, "a", 2))  # a new one: everyone's
        got = [f.decode(errors="replace")[-2:] for f in member.frames[before:]]
        assert got == ["a1", "a2"][1 - expect :], (had, joined_after, got)
