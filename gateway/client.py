"""The small client that speaks the gateway's protocol: one worker's link to one gateway.

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

from chatcluster import auth
from chatcluster.keys import Keys
from gateway import protocol as p
from gateway.zmqreader import BatchReader

log = logging.getLogger("gateway.client")

BATCH = 2000
FLUSH_AT = 1 << 20
"""Bytes queued after which a handled event's acknowledgement sends the batch
at once: a worker busy with a storm of events lets the gateway start writing
instead of waiting for the whole loop turn."""
QUERY_TIMEOUT = 15.0
"""A gateway busy with a storm of work may take seconds to answer; it is not gone."""

Data = str | bytes


def encode_send(client_ids: list[int], data: Data) -> bytes:
    return p.pack([p.SEND, client_ids, data])


def encode_send_all(data: Data, exclude: list[int]) -> bytes:
    return p.pack([p.SEND_ALL, data, exclude])


def encode_send_group(groups: list[str], data: Data, exclude: list[int]) -> bytes:
    return p.pack([p.SEND_GROUP, groups, data, exclude])


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


def encode_set_session(client_id: int, packed_session: bytes) -> bytes:
    return p.pack([p.SET_SESSION, client_id, packed_session])


def encode_update_session(client_id: int, packed_changes: bytes) -> bytes:
    return p.pack([p.UPDATE_SESSION, client_id, packed_changes])


EventHandler = Callable[["GatewayLink", list[Any]], None]


class GatewayLink:
    """A DEALER socket to one gateway: commands and queries out, client events in."""

    _req_ids = itertools.count(1)

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        gateway_id: str,
        address: str,
        worker_id: str,
        on_event: EventHandler,
        keys: Keys | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.address = address
        self.on_event = on_event
        self._asock = ctx.socket(zmq.DEALER)
        self._asock.setsockopt(zmq.ROUTING_ID, worker_id.encode())
        self._asock.setsockopt(zmq.LINGER, 2000)
        self._asock.setsockopt(zmq.SNDHWM, 0)
        self._asock.setsockopt(zmq.RCVHWM, 0)
        self._asock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._asock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._asock.setsockopt(zmq.HEARTBEAT_IVL, p.ZMTP_HEARTBEAT_MS)
        self._asock.setsockopt(zmq.HEARTBEAT_TIMEOUT, p.ZMTP_TIMEOUT_MS)
        if keys is not None:
            keys.client(self._asock)
        self._watcher = auth.ClientWatch(
            self._asock, f"gateway {gateway_id} {address}", keys is not None
        )
        self._asock.connect(address)
        self._reader = BatchReader(self._asock, self._drain)
        self._sock = self._reader.sock
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
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._acks: list[int] = []
        self._flush_scheduled = False
        self._bye_ok: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, hello: list[Any]) -> None:
        self.send_frame(p.pack(hello))
        self._task = asyncio.create_task(self._reader.run())

    def close(self) -> None:
        self.flush()
        self._watcher.close()
        self._reader.stop()
        if self._task is not None:
            self._task.cancel()
        if self._bye_ok is not None and not self._bye_ok.done():
            self._bye_ok.set_result(None)  # the gateway is gone: nothing more will come
        for req_id in list(self._replies):
            self._settle(req_id, exc=ConnectionError(f"link to gateway {self.gateway_id} closed"))
        self._asock.close(linger=1000)

    # Out

    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded command; it leaves at the end of this loop turn."""
        self._asked.clear()  # a query after it may get another answer
        self._queue(frame)

    def _queue(self, frame: bytes) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._flush_soon()

    def ack(self, seq: int) -> None:
        """Acknowledge a handled event, after the commands its handler queued."""
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
        self._asked.clear()
        out, self._out = self._out, []
        self._out_bytes = 0
        if self._acks:
            out.append(p.pack([p.ACK, self._acks]))
            self._acks = []
        if out and not self._sock.closed:
            self._sock.send_multipart(out, zmq.NOBLOCK)
            self._reader.sent()

    def join(self, client_id: int, group: str, hold: bool) -> asyncio.Future[Any]:
        req_id = next(self._req_ids)
        future = self._expect(req_id)
        self.send_frame(p.pack([p.JOIN, client_id, group, hold, req_id]))
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
        self._queue(p.pack([p.QUERY, req_id, kind, list(args)]))
        self._asked[key] = req_id
        return future

    def bye(self) -> asyncio.Future[None]:
        """Ask the gateway to route nothing new here; resolves when it agreed."""
        self._bye_ok = asyncio.get_running_loop().create_future()
        self.send_frame(p.pack([p.BYE]))
        return self._bye_ok

    def _expect(self, req_id: int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._replies[req_id] = future
        self._timeouts[req_id] = loop.call_later(QUERY_TIMEOUT, self._time_out, req_id)
        return future

    def _time_out(self, req_id: int) -> None:
        if req_id in self._replies:
            self._settle(
                req_id,
                exc=TimeoutError(f"gateway {self.gateway_id} did not answer in {QUERY_TIMEOUT} s"),
            )

    def _settle(self, req_id: int, result: Any = None, exc: BaseException | None = None) -> None:
        """Resolve a request's future and those of whoever shares it."""
        timer = self._timeouts.pop(req_id, None)
        if timer is not None:
            timer.cancel()
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
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            for frame in frames:
                self._handle(frame)
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
        elif op == p.BYE_OK:
            if self._bye_ok is not None and not self._bye_ok.done():
                self._bye_ok.set_result(None)
        elif op != p.PING:
            try:
                self.on_event(self, message)
            except Exception:
                log.exception("event handling failed gateway=%s", self.gateway_id)
