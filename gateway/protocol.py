"""The gateway's internal wire protocol, spoken with business workers.

One ZeroMQ ROUTER socket per gateway; each worker links with one DEALER whose
routing id names a *session*: ``worker_id.N``. Every frame is msgpack of a list
whose first item is an opcode; one ZeroMQ message carries one or more frames as
its parts (all that one side queued for the other in one loop turn), handled in
order. One link carries frames in order both ways, which is what gives
per-worker command ordering.

Every message starts with [MSG, n, receipt]: n counts the session's messages
from 1 (0: an unnumbered probe or refusal), so that a lost message is a gap
that ends the session; ``receipt`` (worker -> gateway) asks for a RECEIPT.

Sessions and fencing (see README, "Fencing"): a gateway that declares a worker
gone hands its unacknowledged events to others and refuses the session for
good (FENCED); the worker starts a new session and drops what it held for that
gateway. Commands say which client event caused them ([CAUSE, ...] before
them), so that a gateway carries out each command of an event at most once,
whichever worker ran the event and however often.

Worker -> gateway
    [MSG, n, receipt]                   first part of every message
    [HELLO, worker_id, info]            first message of a session and every heartbeat
    [CAUSE, source, seq, index]         the commands after it, up to the next CAUSE,
                                        are the index-th, index+1-th... of the run of
                                        event seq of gateway prefix ``source`` (an int),
                                        or of the worker's own run seq (``source`` its
                                        id, a str); [CAUSE] alone: no dedup
    [BYE]                               worker is stopping: route no new events to it
    [ACK, [seq, ...]]                   these events were handled
    [SEND, [client_id, ...], data]      data: str -> text frame, bytes -> binary frame
    [SEND_ALL, data, [exclude, ...]]
    [SEND_GROUP, [group, ...], data, [exclude, ...]]
    [SEND_UID, [uid, ...], data]
    [CLOSE, client_id, data | None, code]
    [PUBLISH_GROUP, group, data, [exclude, ...], count, seconds]
                                        a message for a history group: this gateway
                                        hands it to the stream register, which orders
                                        it, keeps the last ``count`` for ``seconds``
                                        and sends it to every gateway (gateway.streams)
    [JOIN, client_id, group, hold, req_id]      answered with REPLY (True, or False if unknown)
    [JOIN, client_id, group, hold, req_id, since]   a history group: the member gets
                                        positions; ``since`` [epoch, offset] first
                                        replays what it missed (or [] for none). REPLY:
                                        {recovered, missed, epoch, offset}, or False
    [LEAVE, client_id, group]
    [UNGROUP, group]
    [BIND_UID, client_id, uid]
    [UNBIND_UID, client_id, uid]
    [SET_SESSION, client_id, packed_session]
    [UPDATE_SESSION, client_id, packed_changes]
    [KEEP, client_id, secret, grace]    keep this client as a member for ``grace``
                                        seconds after its socket goes (gateway.presence)
    [PARK, client_id, version, packed_session, groups, uid, secret, grace]
                                        a kept member of a dead gateway waits here,
                                        bound to the sending worker
    [QUERY, req_id, kind, args]                 answered with REPLY

Gateway -> worker
    [MSG, n]                            first part of every message
    [RECEIPT, n]                        the session's messages up to n were handled
    [FENCED]                            this session was declared gone: start another
    [EVENT_CONNECT, seq, client_id, version, session, request]
    [EVENT_MESSAGE, seq, client_id, version, session, data]
    [EVENT_CLOSE, seq, client_id, version, session]
    [EVENT_CLOSE, seq, client_id, version, session, True]   the member came back as
                                        another client (RESUME): forget it, no on_close
    [EVENT_ADOPT, [[client_id, version, session], ...]]   clients now bound to this worker
    [REPLY, req_id, result]
    [BYE_OK]                            after this no event of this gateway follows
    [PING]                              liveness probe; ignored

``session`` is the msgpack encoding of the client's session dict, kept packed
by the gateway (it never needs to look inside) and versioned: ``version`` grows
by one for each change, which lets a worker tell a stale copy from a fresh one.
``request`` is [path, query, [[name, value], ...], peer].
Events carry a sequence number so that a gateway can hand the unacknowledged
ones of a dead worker to another. ADOPT tells a worker of clients it now
serves that have no event under way, so that it can run their on_close should
their gateway die (a dead gateway cannot send close events itself).
"""

from __future__ import annotations

from typing import Any

import msgpack

from chatcluster import links

HELLO = 1
BYE = 2
ACK = 3
SEND = 10
SEND_ALL = 11
SEND_GROUP = 12
SEND_UID = 13
CLOSE = 14
PUBLISH_GROUP = 15
JOIN = 20
LEAVE = 21
UNGROUP = 22
BIND_UID = 23
UNBIND_UID = 24
SET_SESSION = 25
UPDATE_SESSION = 26
KEEP = 27
PARK = 28
QUERY = 30
MSG = 40
CAUSE = 41

EVENT_CONNECT = 100
EVENT_MESSAGE = 101
EVENT_CLOSE = 102
EVENT_ADOPT = 103
REPLY = 110
BYE_OK = 111
PING = 112
RECEIPT = 113
FENCED = 114

EFFECTS = frozenset(
    {SEND, SEND_ALL, SEND_GROUP, SEND_UID, CLOSE, PUBLISH_GROUP, JOIN, LEAVE, UNGROUP}
    | {BIND_UID, UNBIND_UID, SET_SESSION, UPDATE_SESSION, KEEP, PARK}
)
"""Commands that change something: each is carried out at most once per place in
its event's run (queries and acknowledgements are not counted)."""

# Query kinds: [QUERY, req_id, kind, args]
Q_IS_ONLINE = "is_online"  # [client_id] -> bool
Q_SESSION = "session"  # [client_id] -> packed session | None
Q_UID = "uid"  # [client_id] -> uid | None
Q_UID_CLIENTS = "uid_clients"  # [uid] -> [client_id, ...]
Q_GROUP_SESSIONS = "group_sessions"  # [group] -> [[client_id, packed session], ...]
Q_GROUP_CLIENTS = "group_clients"  # [group] -> [client_id, ...]
Q_GROUP_UIDS = "group_uids"  # [group] -> [uid, ...]
Q_GROUP_COUNT = "group_count"  # [group] -> int
Q_GROUPS = "groups"  # [] -> [group, ...]
Q_COUNT = "count"  # [] -> int
Q_ALL_SESSIONS = "all_sessions"  # [] -> [[client_id, packed session], ...]
Q_RESUME = "resume"  # [client_id, secret, new_client_id] -> [version, packed, groups, uid] | None

HEARTBEAT = links.HEARTBEAT
"""Seconds between two HELLOs of a worker on each of its links."""

WORKER_EXPIRY = links.SILENCE_EXPIRY
"""A worker that sent nothing for this long is taken for hung and its clients move on."""

EMPTY_SESSION = b"\x80"
"""msgpack of {}"""


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def header(n: int, receipt: bool = False) -> bytes:
    """The first part of a message: [MSG, n] (or [MSG, n, True] to ask for a receipt)."""
    return pack([MSG, n, True] if receipt else [MSG, n])


UNNUMBERED = pack([MSG, 0])


def unpack(frame: bytes) -> list[Any]:
    message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    if not isinstance(message, list) or not message or not isinstance(message[0], int):
        raise ValueError("not a gateway protocol message")
    return message


def session_entry(client_id: int, session: bytes) -> bytes:
    """msgpack of [client_id, session] (the packed session as bin): one item of a
    reply of sessions, worth keeping while the session does not change."""
    return msgpack.packb([client_id, session], use_bin_type=True)


def pack_reply_of_sessions(req_id: int, entries: list[bytes]) -> bytes:
    """[REPLY, req_id, [[client_id, packed session], ...]] from ready-made entries.

    A login storm asks for a room's 1,000 sessions a thousand times: the reply
    is a concatenation of stored bytes, and sessions stay packed so that the
    worker decodes each distinct one once (see ``SessionDecoder``).
    """
    return b"".join(
        [
            b"\x93",
            msgpack.packb(REPLY),
            msgpack.packb(req_id),
            _array_header(len(entries)),
            *entries,
        ]
    )


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack_session(session: dict[str, Any]) -> bytes:
    return msgpack.packb(session, use_bin_type=True)


def unpack_session(packed: bytes) -> dict[str, Any]:
    session = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    if not isinstance(session, dict):
        raise ValueError("a session must be a dict")
    return session


class SessionDecoder:
    """Decodes packed sessions, each distinct one once.

    Keyed by the packed bytes themselves, so nothing ever goes stale. Callers
    get a fresh copy of the cached dict, which they may change freely.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._cache: dict[bytes, dict[str, Any]] = {}

    def __call__(self, packed: bytes) -> dict[str, Any]:
        session = self._cache.get(packed)
        if session is None:
            session = unpack_session(packed)
            if len(self._cache) >= self.limit:
                self._cache.clear()
            self._cache[packed] = session
        return session.copy()

    def pairs(self, pairs: list[list[Any]]) -> dict[int, dict[str, Any]]:
        """{client_id: session} from [[client_id, packed], ...], each session a copy."""
        return {cid: session.copy() for cid, session in self.shared_pairs(pairs).items()}

    def shared_pairs(self, pairs: list[list[Any]]) -> dict[int, dict[str, Any]]:
        """Like ``pairs`` but with the cached dicts themselves: read them, never change them."""
        cache = self._cache
        result = {}
        for client_id, packed in pairs:
            session = cache.get(packed)
            if session is None:
                self(packed)
                session = cache[packed]
            result[client_id] = session
        return result
