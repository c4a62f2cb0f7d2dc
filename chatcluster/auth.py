"""Who may join a link, and what a refused peer is told in the logs, on both ends.

Our own ZAP handler (RFC 27) rather than pyzmq's ``Authenticator``: its
callback is given the key but not the peer's address, and a refusal must name
the peer and be logged at most once a minute per peer (a refused member retries
its handshake ten times a second). It lets in the cluster's public key and
nothing else.

Handshakes that fail before ZAP is asked (a peer without CURVE, or with another
server key) are reported by ZeroMQ's socket monitor, which does not name the
peer: those are throttled per bound address and reason. For a peer without
CURVE either end may see the mismatch first and hang up, so the bound end logs
it only when it saw it first; the connecting end always does. On the connecting side
the same monitor tells a refused gateway or worker which register or gateway
refuses it and why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from chatcluster.keys import Keys
from chatcluster.logs import Throttle, held_back

log = logging.getLogger("chatcluster.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
MECHANISM_MISMATCH = 0x11000002  # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
CRYPTOGRAPHIC = 0x11000001  # ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC

PROBE_DELAYS = (0.0, 0.1, 0.5, 1.5)
"""Seconds after a dropped link at which a bound socket's peers are probed."""

_throttle = Throttle()


class Authenticator:
    """Answers ZAP requests for one ZeroMQ context: the cluster key in, any other out."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: Keys) -> None:
        self.public = z85.decode(keys.public)
        """raw, as ZAP hands the peer's key over"""
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self._task = asyncio.ensure_future(self._serve())

    def stop(self) -> None:
        self._task.cancel()
        self.sock.close(linger=0)

    async def _serve(self) -> None:
        while True:
            request = await self.sock.recv_multipart()
            try:
                reply = self.answer(request)
            except Exception:  # a bug here must not leave every handshake waiting
                log.exception("ZAP request failed")
                reply = [request[0], request[1], b"500", b"internal error", b"", b""]
            await self.sock.send_multipart(reply)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """A ZAP reply: 200 for the cluster key over CURVE, 400 for anything else."""
        version, request_id = request[0], request[1] if len(request) > 1 else b""
        if len(request) < 6:
            return [version, request_id, b"500", b"malformed ZAP request", b"", b""]
        address, mechanism, credentials = request[3], request[5], request[6:]
        if mechanism == b"CURVE" and credentials and credentials[0] == self.public:
            return [version, request_id, b"200", b"OK", b"member", b""]
        peer = address.decode(errors="replace")
        key = z85.encode(credentials[0])[:8].decode() if credentials else "-"
        shown = _throttle.hit(("zap", peer, key))
        if shown is not None:
            log.warning(
                "refused a peer with another cluster key peer=%s key=%s%s",
                peer,
                key,
                held_back(shown),
            )
        return [version, request_id, b"400", b"not a member of this cluster", b"", b""]


def start(ctx: zmq.asyncio.Context, keys: Keys | None) -> Authenticator | None:
    """The ZAP handler of a process that binds CURVE sockets (None without keys)."""
    return None if keys is None else Authenticator(ctx, keys)


def describe_server_failure(event: dict[str, Any]) -> str | None:
    """Why a peer's handshake with a bound socket failed; None when it is no refusal."""
    kind, value = int(event["event"]), int(event["value"])
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == MECHANISM_MISMATCH:
            return "a peer without the cluster key (plain ZeroMQ, or --insecure)"
        if value == CRYPTOGRAPHIC:
            return "a peer with another cluster key (it expects another server key)"
        return f"a peer that broke the ZeroMQ protocol (error {value:#x})"
    return None  # AUTH: logged by the ZAP handler, with the peer; NO_DETAIL: a dropped handshake


def describe_client_failure(event: dict[str, Any], secure: bool) -> str | None:
    """Why our handshake with the peer we dial failed; None when it is no refusal."""
    kind, value = int(event["event"]), int(event["value"])
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "it holds another cluster key (copy the cluster's key file to this machine)"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == MECHANISM_MISMATCH:
            if secure:
                return "it runs without a key (--insecure) while we hold one"
            return "it requires the cluster key and we run --insecure"
        return f"the ZeroMQ handshake failed (error {value:#x})"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and secure:
        return "it closed the CURVE handshake: it probably holds another cluster key"
    return None


def report_server_event(event: dict[str, Any]) -> bool:
    """Log a refused handshake on a bound socket (throttled); True if it was one."""
    if not int(event["event"]) & HANDSHAKE_EVENTS:
        return False
    why = describe_server_failure(event)
    if why is not None:
        endpoint = event["endpoint"].decode(errors="replace")
        shown = _throttle.hit(("server", endpoint, why))
        if shown is not None:
            log.warning("refused %s endpoint=%s%s", why, endpoint, held_back(shown))
    return True


class ClientWatch:
    """Logs, throttled, why the peer we dial (``peer``: "register tcp://...") refuses us.

    Make it before connecting; ``close`` it before closing the socket.
    """

    def __init__(self, sock: zmq.asyncio.Socket, peer: str, secure: bool) -> None:
        self.sock = sock
        self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self._task = asyncio.ensure_future(self._watch(peer, secure))

    async def _watch(self, peer: str, secure: bool) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            why = describe_client_failure(event, secure)
            if why is None:
                continue
            shown = _throttle.hit(("client", peer, why))
            if shown is not None:
                log.warning("refused by %s: %s%s", peer, why, held_back(shown))

    def close(self) -> None:
        self._task.cancel()
        if not self.sock.closed:
            self.sock.disable_monitor()
        self.monitor.close(linger=0)


class BoundGuard:
    """A bound ROUTER socket's guard: the cluster key (CURVE server and the ZAP
    handler) and the socket monitor, which logs refused peers and tells
    ``watch``'s caller when a link dropped.

    Make it before binding; ``close`` closes the socket with it.
    """

    def __init__(self, ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket, keys: Keys | None):
        self.sock = sock
        self.authenticator = start(ctx, keys)
        if keys is not None:
            keys.server(sock)
        self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED)

    async def watch(
        self, probe: Callable[[], None], refused: Callable[[], None] | None = None
    ) -> None:
        """Log refused peers (and tell ``refused``); when a link drops, run ``probe``
        a few times.

        The monitor can report the drop before the ROUTER socket has let go of
        the peer, and until it has, a send to it still succeeds: so the probe
        (a send to every peer, which fails at once for a dropped one under
        ROUTER_MANDATORY) is repeated for a moment.
        """
        loop = asyncio.get_running_loop()
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            handshake = int(event["event"]) & HANDSHAKE_EVENTS
            if refused is not None and handshake and describe_server_failure(event):
                refused()
            if not report_server_event(event):
                for delay in PROBE_DELAYS:
                    loop.call_later(delay, probe)

    def close(self, linger: int = 0) -> None:
        """Close the monitor, the socket (after ``linger`` ms) and the ZAP handler."""
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger)
        if self.authenticator is not None:
            self.authenticator.stop()
