"""The register's wire protocol: msgpack lists over ZeroMQ DEALER -> ROUTER.

Every message a gateway or worker sends is a full statement of what it is, sent
again every heartbeat. A register that restarts with an empty table therefore
learns the whole cluster back within one heartbeat interval, without anybody
noticing that it was gone.

    gateway -> register   [GATEWAY, entry]          every HEARTBEAT seconds
    worker  -> register   [WORKER, entry]           every HEARTBEAT seconds
    either  -> register   [BYE, id]                 on a clean stop
    anyone  -> register   [STATUS]                  one-off question

    register -> gateway   [ACCEPTED, prefixes]      prefixes it may use
                          [CONFLICT, prefix]        prefix owned by an older gateway
                          [GONE, id]                this id was declared gone (its link
                                                    dropped and it did not come back in
                                                    time): its clients were closed on the
                                                    workers, so it must start afresh
    register -> worker    [GATEWAYS, register_id, settled, [entry, ...]]
                          [PONG, register_id]       heartbeat answer, nothing changed
    register -> status    [STATUS, {"gateways": [...], "workers": [...], ...}]

Streams (``register.streams``; only the first register of the list sequences),
on a gateway's own stream socket:

    gateway -> register   [STREAMS, gateway_id]     on connect and every HEARTBEAT
                          [PUBLISH, gateway_id, n, first, group, data, exclude, count,
                                    seconds]        n counts the gateway's publishes from
                                                    1; unconfirmed ones are sent again;
                                                    first: its oldest unconfirmed one
                          [PUBLISH, ..., seconds, epoch, offset]   one that another
                                                    register had sequenced there, sent
                                                    again to this one (it took over)
                          [FETCH, req, group, epoch, offset]   also: the gateway has
                                                    members of ``group`` from now on
                          [INTEREST, gateway_id, full, added, removed]
                                                    the groups it has members of: all of
                                                    them (full, in ``added``), or what
                                                    changed; sent to every register
    register -> gateway   [STREAMS, epoch, knows]   the answer to a beat; knows: whether
                                                    it has the gateway's INTEREST (if not,
                                                    the gateway sends all of it)
                          [STREAM, epoch, group, offset, data, exclude, source, n]
                          [STREAM, ..., n, old_epoch, old_offset]   such a publish
                                                    in the stream's order, to the gateways
                                                    with members of the group, to its
                                                    source, and to every gateway whose
                                                    groups this register does not know
                          [POSITIONS, [[group, epoch, last], ...]]  to a stream socket
                                                    heard for the first time
                          [FETCHED, req, group, epoch, last, [[offset, data, exclude,
                                    source, n], ...] | None]   None: not recoverable

A gateway entry is a dict: id, address, prefixes, started, pid, host,
connections, workers. A worker entry: id, started, pid, host, app, gateways.
``settled`` tells a worker that the register has been up long enough to have
heard from every live gateway, so a gateway missing from its table is gone.
"""

from __future__ import annotations

from typing import Any

import msgpack

from chatcluster import links

GATEWAY = "gateway"
WORKER = "worker"
BYE = "bye"
STATUS = "status"
ACCEPTED = "accepted"
CONFLICT = "conflict"
GATEWAYS = "gateways"
PONG = "pong"
GONE = "gone"
STREAMS = "streams"
PUBLISH = "publish"
STREAM = "stream"
FETCH = "fetch"
FETCHED = "fetched"
POSITIONS = "positions"
INTEREST = "interest"

HEARTBEAT = links.HEARTBEAT
"""Seconds between two heartbeats of a gateway or worker."""

EXPIRY = links.SILENCE_EXPIRY
"""Seconds of silence after which the register drops a gateway or worker: a backstop.

A dead member is found sooner: its link drops (ZeroMQ reports it at once, and
ZMTP heartbeats in libzmq's I/O thread take a silent link down within the link
timeout, ``chatcluster.links``), and unless it beats again within LINK_GRACE it
is dropped. A member that is merely busy keeps its link and is never taken for
dead. One that was paused or cut off is told GONE when it comes back."""

LINK_GRACE = 2.0
"""Seconds a member whose link dropped has to come back before it is dropped."""

DEFAULT_ADDRESS = "tcp://127.0.0.1:1236"


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> list[Any]:
    message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError("not a register message")
    return message
