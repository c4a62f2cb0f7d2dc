"""The internal wire formats and the client id layout."""

from __future__ import annotations

import msgpack
import pytest

from gateway import ids
from gateway import link as gw
from gateway import protocol as p
from gateway.connection import text_frame
from register import protocol as rp


def test_commands_round_trip() -> None:
    frame = gw.encode_send_group(["room:"], '{"type":"say"}', [5])
    assert p.unpack(frame) == [p.SEND_GROUP, ["room:"], '{"type":"say"}', [5]]
    assert p.unpack(gw.encode_send([1, 2], b"\x00"))[2] == b"\x00"  # bytes stay bytes
    assert p.unpack(gw.encode_close(7, None, 1000)) == [p.CLOSE, 7, None, 1000]


def test_events_carry_the_session_packed() -> None:
    session = p.pack_session({"name": "猪猪", "n": [1, 2]})
    event = p.pack([p.EVENT_MESSAGE, 9, 123, 4, session, "hi"])
    op, seq, cid, version, packed, data = p.unpack(event)
    assert (op, seq, cid, version, data) == (p.EVENT_MESSAGE, 9, 123, 4, "hi")
    assert p.unpack_session(packed) == {"name": "猪猪", "n": [1, 2]}
    assert p.unpack_session(p.EMPTY_SESSION) == {}


@pytest.mark.parametrize(
    "frame", [msgpack.packb({"a": 1}), msgpack.packb([]), msgpack.packb(["x"]), b"\xc1"]
)
def test_garbage_is_refused(frame: bytes) -> None:
    with pytest.raises(ValueError):
        p.unpack(frame)


def test_a_session_must_be_a_dict() -> None:
    with pytest.raises(ValueError):
        p.unpack_session(msgpack.packb([1]))


def test_register_messages() -> None:
    assert rp.unpack(rp.pack([rp.STATUS])) == [rp.STATUS]
    with pytest.raises(ValueError):
        rp.unpack(msgpack.packb([1, 2]))


def test_client_ids_fit_json_and_name_their_gateway() -> None:
    prefix = ids.fresh_prefix()
    alloc = ids.IdAllocator(prefix)
    first, second = alloc.next(), alloc.next()
    assert second == first + 1
    assert ids.prefix_of(first) == prefix
    assert first < 2**53
    largest = ids.make((1 << ids.PREFIX_BITS) - 1, ids.MAX_COUNTER)
    assert largest == 2**53 - 1


def test_a_spent_counter_moves_to_a_fresh_prefix() -> None:
    alloc = ids.IdAllocator(ids.fresh_prefix())
    alloc.counter = ids.MAX_COUNTER - 1
    last_old = alloc.next()
    first_new = alloc.next()
    assert ids.prefix_of(first_new) > ids.prefix_of(last_old)
    assert alloc.prefixes == [ids.prefix_of(last_old), ids.prefix_of(first_new)]


def test_a_refused_unused_prefix_is_simply_replaced() -> None:
    alloc = ids.IdAllocator(ids.fresh_prefix())
    old = alloc.prefix
    alloc.renew(after=old)
    assert alloc.prefix > old and alloc.prefixes == [alloc.prefix]


def test_frames_are_plain_rfc6455() -> None:
    assert text_frame("hi") == b"\x81\x02hi"
    assert text_frame(b"\x00", binary=True) == b"\x82\x01\x00"
    big = text_frame("x" * 300)
    assert big[:4] == b"\x81\x7e\x01\x2c" and len(big) == 304


def test_a_reply_of_sessions_is_a_concatenation_of_entries() -> None:
    pairs = [(i, p.pack_session({"name": f"u{i}"})) for i in range(70_000)]
    for n in (0, 3, 20, 70_000):
        entries = [p.session_entry(cid, packed) for cid, packed in pairs[:n]]
        message = p.unpack(p.pack_reply_of_sessions(7, entries))
        assert message[:2] == [p.REPLY, 7]
        assert message[2] == [[cid, packed] for cid, packed in pairs[:n]]


def test_each_distinct_session_is_decoded_once_and_handed_out_as_a_copy() -> None:
    decode = p.SessionDecoder(limit=2)
    packed = p.pack_session({"name": "猪猪"})
    first = decode(packed)
    first["name"] = "changed by the app"
    assert decode(packed) == {"name": "猪猪"}  # the cache did not see the change
    assert decode(p.pack_session({"a": 1})) == {"a": 1}
    assert decode(p.pack_session({"b": 2})) == {"b": 2}  # over the limit: starts afresh
    assert decode(p.EMPTY_SESSION) == {}
    pairs = decode.pairs([[5, packed], [3, packed]])
    assert pairs == {5: {"name": "猪猪"}, 3: {"name": "猪猪"}} and pairs[5] is not pairs[3]
