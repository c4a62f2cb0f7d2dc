"""Stand-ins for the gateway's ROUTER socket and client connections, shared by the
unit tests of its routing (``WorkerPool``) and command handling (``Commands``)."""

from __future__ import annotations

import errno
from typing import Any

import zmq

from gateway import protocol as p


class FakeSocket:
    """Records what a ROUTER socket would send; peers listed in ``gone`` are unreachable."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[Any]]] = []
        self.gone: set[bytes] = set()

    def send_multipart(self, parts: list[bytes], flags: int = 0) -> None:
        route, head, *frames = parts
        if route in self.gone:
            raise zmq.ZMQError(errno.EHOSTUNREACH)
        assert p.unpack(head)[0] == p.MSG
        self.sent.extend((route, p.unpack(frame)) for frame in frames)

    def events(self, route: bytes | None = None) -> list[list[Any]]:
        """Client events sent (to ``route``, or to anyone)."""
        return [
            m for r, m in self.sent if (route is None or r == route) and m[0] >= 100 and m[0] < 110
        ]

    def to(self, route: bytes, op: int) -> list[list[Any]]:
        """Messages of kind ``op`` sent to ``route``."""
        return [m for r, m in self.sent if r == route and m[0] == op]


class FakeConn:
    """A client as the routing and the command handling see it: frames written to it
    are kept, and what the pool asked of it (pause, close) is recorded."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.session = p.EMPTY_SESSION
        self.session_version = 0
        self.route: Any = None  # the pool's own record (gateway.workers.Route)
        self.frames: list[bytes] = []
        self.open = True
        self.paused = False
        self.closed_with: int | None = None

    @property
    def worker(self) -> bytes | None:
        return None if self.route is None else self.route.worker

    @property
    def pending(self) -> int:
        return 0 if self.route is None else self.route.pending

    @property
    def queued(self) -> int:
        return 0 if self.route is None else self.route.queued

    def write(self, frame: bytes) -> None:
        self.frames.append(frame)

    write_direct = write

    def hold_until_direct(self) -> None:
        pass

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = code
