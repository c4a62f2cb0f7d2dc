"""A gateway's figures: plain counters on the hot path, read into metrics on demand.

``COUNTS`` is one object per process (a gateway process runs one gateway). The
code that counts does ``COUNTS.x += 1`` or adds a whole broadcast's recipients
at once (``gateway.commands``): no call, no allocation, no lock per frame. The
rest is read where it already is (``len(gateway.clients)``, the pool's queue).
``snapshot`` turns all of it into the catalogue's names (``chatcluster.metrics``)
once per heartbeat, for the register, and once per scrape of ``--metrics``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from chatcluster.metrics import Snapshot, labelled

if TYPE_CHECKING:
    from websockets.server import ServerProtocol

    from gateway.server import Gateway

CLOSE_CODES = frozenset((1000, 1001, 1006, 1007, 1008, 1009, 1011, 1012, 1013))
"""Close codes counted by their number; any other is counted as "other" (bounded labels)."""


class GatewayCounts:
    """The counters (see the catalogue in ``chatcluster.metrics`` for what each means)."""

    __slots__ = (
        "byes",
        "bytes_in",
        "bytes_out",
        "disconnects",
        "fenced_messages",
        "flood_pauses",
        "frames_out",
        "handed_over",
        "handshakes",
        "internal_in",
        "internal_out",
        "messages_in",
        "refusals",
        "resets",
        "unknown_sends",
        "workers_lost",
    )

    def __init__(self) -> None:
        self.handshakes = 0
        self.refusals: Counter[int] = Counter()
        self.messages_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.disconnects: Counter[str] = Counter()
        self.resets = 0
        self.flood_pauses = 0
        self.unknown_sends = 0
        self.handed_over = 0
        self.workers_lost: Counter[str] = Counter()
        self.byes = 0
        self.fenced_messages = 0
        self.internal_in = 0
        self.internal_out = 0

    def disconnected(self, ws: ServerProtocol | None) -> None:
        """A client connection ended: count it by the close code of its closing handshake
        (ours if we closed, else the client's; 1006 without one)."""
        if ws is None:
            return  # never opened: the handshake counters have it
        close = ws.close_sent or ws.close_rcvd
        code = close.code if close is not None else 1006
        self.disconnects[str(code) if code in CLOSE_CODES else "other"] += 1

    def delivered(self, sent: int, frame: bytes) -> None:
        """``sent`` clients were given ``frame``: counted once per command, never per recipient."""
        self.frames_out += sent
        self.bytes_out += sent * len(frame)

    def lost(self, why: str, replayed: int) -> None:
        """A worker session was lost; ``replayed`` of its events go to other workers."""
        self.workers_lost[why] += 1
        self.handed_over += replayed


COUNTS = GatewayCounts()


def snapshot(gateway: Gateway) -> Snapshot:
    """Every figure of ``gateway``, by the catalogue's names."""
    c = COUNTS
    pool = getattr(gateway, "pool", None)
    presence = getattr(gateway, "presence", None)  # both made in run()
    waiting = events = refused = linked = 0
    if pool is not None:
        waiting = len(pool.waiting) + sum(len(items) for _, items in pool.parked.values())
        events, refused, linked = pool._seq, pool.refused, pool.live
    return {
        "process_up_seconds": round(time.time() - STARTED, 1),
        "gateway_connections": presence.live if presence is not None else len(gateway.clients),
        "gateway_members_away": len(presence.away) if presence is not None else 0,
        "gateway_handshakes_total": c.handshakes,
        "gateway_handshake_refusals_total": labelled(c.refusals),
        "gateway_client_messages_received_total": c.messages_in,
        "gateway_client_bytes_received_total": c.bytes_in,
        "gateway_client_frames_sent_total": c.frames_out,
        "gateway_client_bytes_sent_total": c.bytes_out,
        "gateway_disconnects_total": labelled(c.disconnects),
        "gateway_slow_consumers_closed_total": gateway.stats_slow_closed,
        "gateway_connection_resets_total": c.resets,
        "gateway_flood_pauses_total": c.flood_pauses,
        "gateway_unknown_client_sends_total": c.unknown_sends,
        "gateway_workers_linked": linked,
        "gateway_events_total": events,
        "gateway_events_waiting": waiting,
        "gateway_events_refused_total": refused,
        "gateway_events_handed_over_total": c.handed_over,
        "gateway_workers_lost_total": labelled(c.workers_lost),
        "gateway_worker_byes_total": c.byes,
        "gateway_fenced_messages_total": c.fenced_messages,
        "gateway_internal_messages_received_total": c.internal_in,
        "gateway_internal_messages_sent_total": c.internal_out,
    }


STARTED = time.time()
