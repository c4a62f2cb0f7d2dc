"""One client WebSocket connection: asyncio glue around websockets' sans-I/O core.

Why sans-I/O rather than a full server library: a gateway holds tens of
thousands of mostly idle connections and writes the same pre-built frame to
many of them. The opening handshake is ours (``gateway.handshake``, about 6x
cheaper than the library's); after it a ``websockets`` protocol object, created
already open, parses the frames, answers pings and runs the closing handshake
(RFC 6455), while this module keeps per-connection state in slots and starts
no task per connection; outgoing frames are queued here and written straight
to the socket by ``gateway.outbox``.
Measured here: about 5 KiB per idle connection, against 14 KiB or more for the
full libraries.

Two checks the sans-I/O core leaves to us: text messages must be UTF-8 (close
1007), and fragmented messages are reassembled here (the size cap, close 1009,
is enforced across fragments by the core's ``max_size``).

Every byte a client can make the gateway hold is bounded (defaults from
``GatewayConfig``):

- what we send it, app frames and the protocol's own (pongs, close frames)
  alike: over ``max_send_buffer`` (1 MiB) unsent in the transport, the client is
  cut off (1008, logged once) and reset CLOSE_TIMEOUT later;
- a message: ``max_message_size`` bytes (64 KiB, also across fragments, close
  1009) and ``max_fragments`` frames (1,024, close 1009); a half-sent frame is
  held by the core's parser only up to ``max_message_size`` (it refuses a
  longer frame from its header);
- its events: ``flood_limit`` (100) not yet acknowledged, waiting for a worker
  or parked (``gateway.workers``), then it is not read; the read in hand is
  parsed READ_SLICE bytes at a time, and what is left of it when the pause
  comes waits unparsed (``_unread``) until the workers catch up;
- the opening handshake: 16 KiB of head (``gateway.handshake``), HANDSHAKE_TIMEOUT;
- time: a connection we close, refuse or cut off, or whose client closes while
  we still hold unsent bytes for it, is reset (SO_LINGER 0) if it is still
  there CLOSE_TIMEOUT later; once failed (1007, 1008, 1009) nothing it sends
  is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import TYPE_CHECKING, Protocol

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from gateway.handshake import HandshakeParser, Refused, refuse
from gateway.metrics import COUNTS
from gateway.outbox import Outbox, write_all
from gateway.protocol import session_entry

if TYPE_CHECKING:
    from gateway.workers import Route

log = logging.getLogger("gateway.connection")

OPEN = State.OPEN
TEXT = Opcode.TEXT
BINARY = Opcode.BINARY
CONT = Opcode.CONT
CLOSE_TIMEOUT = 5.0
"""Seconds a client gets to answer our close frame before the TCP connection is cut."""
LINGER_RESET = struct.pack("ii", 1, 0)
HOLD_LIMIT = 50_000
"""Frames a held client may collect before they are let through anyway. Large:
letting them through before the snapshot breaks the snapshot's promise (in a
login storm of 1,000 users a held client collects up to 1,000 logins)."""
HOLD_TIMEOUT = 30.0
"""Seconds a hold lasts at most, should the worker that asked for it die."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection gets to send its whole opening handshake (then 408)."""
READ_SLICE = 4096
"""Bytes of a read handed to the frame parser at a time. A flood pause (see
``pause``) takes effect between slices, so a client overshoots ``flood_limit``
by at most one slice's frames (683 empty ones), not by a whole read (uvloop
reads up to 256 KiB: 43,690 empty frames). Reads of at most a slice, a chat's,
take the direct path. Measured cost: a 64 KiB frame read whole 33 -> 55 us
(16 parser steps instead of one); 1,000 small frames in one read unchanged."""


def text_frame(data: str | bytes, *, binary: bool = False) -> bytes:
    """Encode one unmasked server frame, once, for any number of recipients."""
    payload = data.encode() if isinstance(data, str) else data
    return Frame(BINARY if binary else TEXT, payload).serialize(mask=False)


class ConnectionOwner(Protocol):
    """What a connection may ask of the gateway that holds it (``gateway.server``)."""

    max_message_size: int
    """bytes of one message, across its fragments (over it: close 1009)"""
    max_fragments: int
    """frames of one message (over it: close 1009)"""
    outbox: Outbox
    """where the connection says it has frames queued for this loop turn"""

    def opened(self, conn: ClientConnection, path: str, headers: list[tuple[str, str]]) -> None:
        """The opening handshake succeeded: give the client its id, tell a worker."""

    def received(self, conn: ClientConnection, message: str | bytes) -> None:
        """A whole message arrived (text already checked as UTF-8)."""

    def closed(self, conn: ClientConnection) -> None:
        """The connection is gone (only called once it was given an id)."""

    def cut_off(self, conn: ClientConnection) -> None:
        """The client was cut off as too slow (counted, once per connection)."""


class ClientConnection(asyncio.Protocol):
    """A client socket; reports opened / message / closed to its owner."""

    __slots__ = (
        "_close_timer",
        "_entry",
        "_fragments",
        "_fragments_text",
        "_handshake",
        "_handshake_timer",
        "_hold_timer",
        "_unread",
        "client_id",
        "fd",
        "hold",
        "kept",
        "out",
        "outbox",
        "owner",
        "route",
        "session",
        "session_version",
        "transport",
        "writable",
        "ws",
    )

    def __init__(self, owner: ConnectionOwner) -> None:
        self.owner = owner
        self.outbox = owner.outbox
        self.ws: ServerProtocol | None = None
        """the frame protocol, from the end of the opening handshake on"""
        self._handshake: HandshakeParser | None = HandshakeParser()
        self._handshake_timer: asyncio.TimerHandle | None = None
        """cancelled once the handshake is over: a pending timer would keep this
        object (and whatever it holds) alive for HANDSHAKE_TIMEOUT after it closed"""
        self.transport: asyncio.Transport | None = None
        """None once the connection is lost: nothing may touch the socket then"""
        self._close_timer: asyncio.TimerHandle | None = None
        """resets the connection CLOSE_TIMEOUT after we closed, refused or cut it
        off; cancelled when it is lost (it would keep this object alive, and a
        late abort would reach a closed socket)"""
        self.client_id = 0
        self.session = b"\x80"
        self.session_version = 0
        self._entry: bytes | None = None
        self.route: Route | None = None
        """where its events go: ``gateway.workers``' record, written there only"""
        self.kept: tuple[str, float] | None = None
        """(secret, grace) of a member the app keeps through a disconnect (gateway.presence)"""
        self.hold: list[bytes] | None = None
        """frames held back until the next direct send (see ``hold_until_direct``)"""
        self._hold_timer: asyncio.TimerHandle | None = None
        """ends the hold after HOLD_TIMEOUT; cancelled with the hold, so that it
        neither ends a later hold early nor keeps a closed connection alive"""
        self._fragments: list[bytes] | None = None
        self._fragments_text = False
        self.out: bytes | list[bytes] | None = None
        """what this loop turn queued: one frame, or a list of several (written,
        and emptied, by ``gateway.outbox``)"""
        self.writable = False
        """``ws.state is OPEN``, kept in a slot: the property costs a call per delivery"""
        self.fd = -1
        """the socket's descriptor while queued frames may bypass the transport, else -1"""
        self._unread: bytes | None = None
        """None while reading; while paused (a flood), the bytes of the last read
        not yet parsed (often b""), parsed first when reading resumes"""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # pause_writing / resume_writing then say exactly when the transport holds
        # unsent bytes, which the outbox's direct writes must not overtake.
        transport.set_write_buffer_limits(high=0, low=0)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self._handshake_timed_out
        )

    def data_received(self, data: bytes) -> None:
        COUNTS.bytes_in += len(data)
        if self.ws is None:
            data = self._opening(data)
            if not data:
                return
        if self._unread is None and len(data) <= READ_SLICE:
            self._parse(data)
        else:
            self._receive(data)

    def eof_received(self) -> bool:
        if self.ws is not None:
            self.ws.receive_eof()
            self._closing()
            self._flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        COUNTS.disconnected(self.ws)
        self._closing()
        self.transport = None
        self._unread = None
        self._fragments = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self.hold is not None:
            self._end_hold()
        if self.client_id:
            self.owner.closed(self)

    def pause_writing(self) -> None:
        """The transport holds unsent bytes: queued frames go through it, behind them."""
        self.fd = -1

    def resume_writing(self) -> None:
        """The transport has sent everything: frames may go straight to the socket again."""
        if self.writable:
            self.fd = self._direct_fd()

    # Session

    def replace_session(self, packed: bytes) -> None:
        """Store a new packed session (the gateway never looks inside)."""
        self.session = packed
        self.session_version += 1
        self._entry = None

    def entry(self) -> bytes:
        """This client's item in a reply of sessions, packed once per session."""
        entry = self._entry
        if entry is None:
            entry = self._entry = session_entry(self.client_id, self.session)
        return entry

    # Writing

    @property
    def open(self) -> bool:
        return self.ws is not None and self.ws.state is OPEN

    def write(self, frame: bytes) -> None:
        """Queue a pre-encoded frame, unless the client is gone or held back.

        Frames queued during one loop turn (one batch of worker commands) leave
        in a single write, each still its own WebSocket frame: one system call
        per socket per batch instead of one per message. This runs once per
        recipient of a broadcast, so it only reads slots and allocates nothing
        for the first frame of a turn.
        """
        if self.hold is None:
            if self.writable:
                out = self.out
                if out is None:
                    self.out = frame
                    self.outbox.later(self)
                elif out.__class__ is list:
                    out.append(frame)
                else:
                    self.out = [out, frame]
        else:
            self.hold.append(frame)
            if len(self.hold) > HOLD_LIMIT:
                self._release_hold()

    def flush_out(self) -> None:
        """Write what this loop turn queued now, ahead of the outbox."""
        write_all((self,), self.outbox.max_send_buffer)

    def write_direct(self, frame: bytes) -> None:
        """Write a frame addressed to this client by id; releases held frames after it."""
        held = self.hold
        if held is None:
            self.write(frame)
            return
        self._end_hold()
        self.write(frame)
        for f in held:
            self.write(f)

    def hold_until_direct(self) -> None:
        """Hold back group and broadcast frames until the next direct write.

        Used by a group join that is followed by a snapshot (the chat's
        user_list): everything broadcast after the join reaches the client after
        the snapshot, whichever worker sent it.
        """
        if self.hold is None:
            self.hold = []
            self._hold_timer = asyncio.get_running_loop().call_later(
                HOLD_TIMEOUT, self._release_hold
            )

    def _release_hold(self) -> None:
        held = self.hold
        if held is not None:
            self._end_hold()
            for f in held:
                self.write(f)

    def _end_hold(self) -> None:
        self.hold = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection goes when the client answers.

        A client that does not answer within CLOSE_TIMEOUT is reset. Nothing is done
        for a connection already lost or closing (refused, failed, cut off): a
        close command may race with the client's own going.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        ws = self.ws
        if ws is None:  # still in the opening handshake: no WebSocket to close yet
            self._handshake = None
            self._end_transport()
            return
        if ws.state is OPEN:
            self.flush_out()  # a last message goes before the close frame
            if ws.state is not OPEN:  # that last message cut it off (``cut_off``)
                return
            ws.send_close(code, reason)
            self._closing()
            self._flush()
            self._abort_later()
        # CLOSING or CLOSED: a close is already under way.

    def pause(self) -> None:
        """Stop reading this client (a flood, ``gateway.workers``).

        What is left of the read being parsed waits too (``_unread``): the pause
        takes effect within READ_SLICE bytes, not at the end of a 256 KiB read.
        """
        if self._unread is None:
            COUNTS.flood_pauses += 1
            self._unread = b""
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.pause_reading()

    def resume(self) -> None:
        """Read again, starting with what was left of the read that paused."""
        unread = self._unread
        if unread is None:
            return
        self._unread = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if unread:
            # Called from the pool's ack loop: an error here must not cut that short.
            try:
                self._receive(unread)
            except Exception:
                log.exception("reading held bytes failed client=%d", self.client_id)
                self.abort()
                return
            if self._unread is not None:  # what it held paused it again
                return
        transport.resume_reading()

    # Internals

    def abort(self) -> None:
        """Reset the TCP connection now, even one already closing behind a full buffer.

        A plain close leaves unsent data (up to megabytes for a client that stopped
        reading) in the kernel, which keeps the connection until the client reads;
        SO_LINGER 0 makes the kernel reset it and free the buffers at once. Does
        nothing once the connection is lost: its socket is closed then (uvloop's
        socket object says fd -1, and setsockopt raises ValueError).
        """
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        transport = self.transport
        if transport is None:
            return
        COUNTS.resets += 1
        self._closing()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        transport.abort()

    def _abort_later(self) -> None:
        """Reset the connection CLOSE_TIMEOUT from now unless it is gone by then."""
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def _end_transport(self) -> None:
        """Close the socket once what is written has left; reset it if that takes too long.

        ``transport.close()`` waits for unsent bytes as long as the client does not
        read, which may be forever.
        """
        transport = self.transport
        transport.close()
        if transport.get_write_buffer_size():
            self._abort_later()

    def cut_off(self) -> None:
        """Cut off a client whose transport holds over ``max_send_buffer`` unsent bytes.

        Called for app frames (``gateway.outbox``) and the protocol's own (``_flush``),
        once per connection: from then on the transport is closing, which both
        callers check. 1008, a WARNING line, and a reset after CLOSE_TIMEOUT, since
        the close frame waits behind what the client does not read.
        """
        log.warning(
            "client too slow, closing client=%d buffered=%d",
            self.client_id,
            self.transport.get_write_buffer_size(),
        )
        self.owner.cut_off(self)
        self._fail(1008, "send buffer full")
        self._flush()
        self._abort_later()

    def _fail(self, code: int, reason: str) -> None:
        """Fail the WebSocket (close frame, end of stream): nothing more it sends is read.

        websockets' ``fail`` replaces its parser with one that discards input, and
        the end of stream closes the transport, which stops reading.
        """
        self._fragments = None
        self.ws.fail(code, reason)
        self._closing()

    def _flush(self) -> None:
        """Write what the protocol itself has to send: pongs, close frames, the end.

        These count against ``max_send_buffer`` like app frames: a client that
        pings and never reads is cut off (``cut_off``) instead of growing the
        transport's buffer pong by pong. One write for all of them.
        """
        ws = self.ws
        if ws is None:
            return
        writes = ws.data_to_send()
        if not writes:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # lost, or we have ended it: nothing more goes out
        # The end of stream (b"") is always the last item: the protocol sends
        # nothing after it.
        eof = not writes[-1]
        data = writes[0] if len(writes) == 1 else b"".join(writes)
        if data:
            transport.write(data)
        if eof:
            self._end_transport()
        elif transport.get_write_buffer_size() > self.outbox.max_send_buffer:
            self.cut_off()

    def _now_open(self) -> None:
        """Call once the opening handshake is done (``ws.state`` is OPEN)."""
        self.writable = self.ws.state is OPEN
        if self.writable:
            self.fd = self._direct_fd()

    def _closing(self) -> None:
        """Stop queueing and direct writes: called wherever ``ws.state`` can leave OPEN.

        Also the guarantee that ``fd`` is never used once the loop has closed the
        descriptor (it does so only after ``connection_lost``), when the number may
        already belong to another connection.
        """
        self.writable = False
        self.fd = -1

    def _direct_fd(self) -> int:
        """The socket's descriptor if frames may be written to it directly, else -1.

        Not under TLS (the bytes must go through the TLS layer), nor while the
        transport is closing or holds unsent bytes.
        """
        transport = self.transport
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or transport.get_extra_info("sslcontext") is not None
        ):
            return -1
        sock = transport.get_extra_info("socket")
        return -1 if sock is None else sock.fileno()

    def _handshake_timed_out(self) -> None:
        """A connection that never completes its handshake does not keep its socket."""
        self._handshake_timer = None
        transport = self.transport
        if self._handshake is not None and transport is not None and not transport.is_closing():
            self._handshake = None
            log.info("handshake timed out after %.0f s", HANDSHAKE_TIMEOUT)
            transport.write(refuse(408, "the opening handshake took too long").response)
            self._end_transport()

    def _opening(self, data: bytes) -> bytes:
        """Feed the opening handshake; once accepted, return the bytes that followed it."""
        if self._handshake is None:  # refused or timed out: the connection is closing
            return b""
        outcome = self._handshake.feed(data)
        if outcome is None:
            return b""
        self._handshake = None
        self._handshake_timer.cancel()
        self._handshake_timer = None
        transport = self.transport
        transport.write(outcome.response)
        if isinstance(outcome, Refused):
            log.info("handshake refused status=%d reason=%s", outcome.status, outcome.reason)
            self._end_transport()
            return b""
        self.ws = ServerProtocol(state=OPEN, max_size=self.owner.max_message_size)
        self._now_open()
        self.owner.opened(self, outcome.path, outcome.headers)
        return outcome.leftover

    def _receive(self, data: bytes) -> None:
        """Parse a read READ_SLICE bytes at a time; keep the rest if a slice paused us."""
        if self._unread is not None:  # paused: it waits, in order, behind what waits
            self._unread += data
            return
        size = len(data)
        if size <= READ_SLICE:
            self._parse(data)
            return
        for start in range(0, size, READ_SLICE):
            if self._unread is not None:
                self._unread = data[start:]
                return
            self._parse(data[start : start + READ_SLICE])

    def _parse(self, data: bytes) -> None:
        """Feed bytes to the frame parser; hand on the messages; write its answers."""
        ws = self.ws
        ws.receive_data(data)
        if self.writable and ws.state is not OPEN:
            self._closing()
        # Frames before a close or a bad frame in these bytes still count (the
        # parser stops there); once we fail the connection, those after it do not.
        for frame in ws.events_received():
            if self._frame(frame):
                break
        self._flush()

    def _frame(self, frame: Frame) -> bool:
        """Hand on a data frame; True if it failed the connection (1007, 1009)."""
        opcode = frame.opcode
        if opcode is TEXT or opcode is BINARY:
            if frame.fin:
                return self._message(opcode is TEXT, frame.data)
            self._fragments = [frame.data]
            self._fragments_text = opcode is TEXT
        elif opcode is CONT:
            fragments = self._fragments
            fragments.append(frame.data)
            if len(fragments) > self.owner.max_fragments:
                # Empty fragments never reach the byte cap, and each costs a list
                # slot and a Frame: the count has a cap of its own.
                log.info(
                    "too many fragments, closing client=%d fragments=%d",
                    self.client_id,
                    len(fragments),
                )
                self._fail(1009, f"message over {self.owner.max_fragments} fragments")
                return True
            if frame.fin:
                self._fragments = None
                return self._message(self._fragments_text, b"".join(fragments))
        return False

    def _message(self, text: bool, data: bytes) -> bool:
        """Hand on a whole message; True if it failed the connection (not UTF-8, 1007)."""
        if text:
            try:
                message: str | bytes = bytes(data).decode()
            except UnicodeDecodeError as exc:
                log.info("invalid UTF-8, closing client=%d", self.client_id)
                self._fail(1007, f"invalid UTF-8 at byte {exc.start}")
                return True
        else:
            message = bytes(data)
        COUNTS.messages_in += 1
        self.owner.received(self, message)
        return False
