"""Members kept through a disconnect: the gateway's side of the app's grace period.

A client the app keeps (KEEP, sent by ``api.keep_member``) does not leave when
its connection drops or is closed by our side (a drain's 1012, a gateway
going away); one that closes it itself, with a close frame, has left. It
stays in the client table with its session, groups and uid, as an *away*
member that is written nothing, for the grace the app chose: group rosters
still list it, and nobody is told it left. Then either

- it comes back: the worker handling its new connection, on any gateway, asks
  every gateway to RESUME it; the one that holds it takes it out of the table
  without a close event and answers with its session, groups and uid, and its
  worker gets a *quiet* close (forget this client, run no on_close); or
- the grace ends: its close event goes to its worker like any other, so
  on_close runs once, through the same fenced, replayed path.

A kept client whose socket is still open here when it resumes elsewhere (a
dropped network that TCP has not noticed yet) is taken over the same way and
closed with 1000.

When a gateway dies, the worker that served each of its kept members parks it
(PARK) on a live gateway, where it waits out the grace the same way, bound to
that worker (``businessworker.presence``). A draining gateway's members become
away here and are parked elsewhere once it has gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway import protocol as p

if TYPE_CHECKING:
    from gateway.clients import ClientTable
    from gateway.connection import ClientConnection
    from gateway.streams import StreamLink
    from gateway.workers import WorkerPool

log = logging.getLogger("gateway.presence")

MAX_GRACE = 3600.0
"""The longest grace a worker may ask for: a kept member costs its session's bytes."""
TAKEN_KEPT = 60.0
"""Seconds a resumed member's answer is kept for a repeat of the same RESUME (the
worker that asked died before acting on it, and another runs the login again)."""


class Presence:
    """Away members of this gateway, and the timers that end their grace."""

    def __init__(
        self,
        clients: ClientTable,
        pool: WorkerPool,
        streams: StreamLink | None,
        make_conn: Callable[[], ClientConnection],
    ) -> None:
        self.clients = clients
        self.pool = pool
        self.streams = streams
        self.make_conn = make_conn
        self.away: dict[int, ClientConnection] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._detached: set[int] = set()
        """clients taken over while their socket was open: their close is no event"""
        self._taken: dict[tuple[int, str], tuple[float, int, list[Any]]] = {}
        """(client id, secret) -> (when, new client id, answer) of recent resumes"""

    @property
    def live(self) -> int:
        """Clients in the table that have a socket here."""
        return len(self.clients) - len(self.away)

    def keep(self, conn: ClientConnection, secret: str, grace: float) -> None:
        conn.kept = (str(secret), min(max(float(grace), 0.0), MAX_GRACE))

    def closed(self, conn: ClientConnection) -> bool:
        """A socket went: True if this gateway keeps the client as away (no close event)."""
        if conn.client_id in self._detached:
            self._detached.discard(conn.client_id)
            return True
        if conn.kept is None or conn.kept[1] <= 0:
            return False
        ws = conn.ws
        if ws is not None and ws.close_rcvd is not None and ws.close_rcvd_then_sent:
            return False  # the client said goodbye (a Leave button, a closed tab): it left
        self._away(conn)
        return True

    def park(self, worker_id: bytes, m: list[Any]) -> None:
        """[PARK, client_id, version, packed, groups, uid, secret, grace] from ``worker_id``."""
        client_id, version, packed, groups, uid, secret, grace = m[1:8]
        p.unpack_session(packed)  # refuse anything that is not a packed dict
        if client_id in self.clients.clients:
            return  # parked before (a replay)
        conn = self.make_conn()
        conn.client_id = int(client_id)
        conn.session = packed
        conn.session_version = int(version)
        self.pool.bind(conn, worker_id)
        self.clients.add(conn)
        for group in groups or ():
            self.clients.join(conn, str(group))
        if uid is not None:
            self.clients.bind_uid(conn, str(uid))
        self.keep(conn, secret, grace)
        self._away(conn)

    def resume(self, client_id: int, secret: str, new_client_id: int) -> list[Any] | None:
        """Take a kept member out for its new connection: [version, packed, groups, uid]."""
        now = time.monotonic()
        taken = self._taken.get((client_id, secret))
        if taken is not None:
            return taken[2] if taken[1] == new_client_id else None
        conn = self.clients.get(client_id)
        if conn is None or conn.kept is None or conn.kept[0] != secret:
            return None
        table = self.clients
        answer = [
            conn.session_version,
            conn.session,
            table.groups_of(client_id),
            table.uid_of(client_id),
        ]
        timer = self._timers.pop(client_id, None)
        if timer is not None:
            timer.cancel()
        if self.away.pop(client_id, None) is None:  # still open here: take it over
            self._detached.add(client_id)
            if self.streams is not None:
                self.streams.forget(conn)
            conn.close(1000, "resumed on another connection")
        self.clients.remove(conn)
        self.pool.event(conn, p.EVENT_CLOSE, True)
        for key in [k for k, v in self._taken.items() if now - v[0] > TAKEN_KEPT]:
            del self._taken[key]
        self._taken[(client_id, secret)] = (now, new_client_id, answer)
        log.info("member resumed client=%d as client=%d", client_id, new_client_id)
        return answer

    def drop_all(self) -> None:
        """Forget every away member without a close event (the cluster gave up on this
        gateway, and its workers parked them elsewhere; or it is stopping)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for conn in self.away.values():
            self.clients.remove(conn)
        self.away.clear()

    def _away(self, conn: ClientConnection) -> None:
        if self.streams is not None:
            self.streams.forget(conn)
        self.away[conn.client_id] = conn
        grace = conn.kept[1] if conn.kept is not None else 0.0
        self._timers[conn.client_id] = asyncio.get_running_loop().call_later(
            grace, self._expire, conn.client_id
        )

    def _expire(self, client_id: int) -> None:
        self._timers.pop(client_id, None)
        conn = self.away.pop(client_id, None)
        if conn is None:
            return
        log.info("member left after its grace client=%d", client_id)
        self.clients.remove(conn)
        self.pool.event(conn, p.EVENT_CLOSE)
