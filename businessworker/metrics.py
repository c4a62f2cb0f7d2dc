"""A worker's figures: events and callbacks (``businessworker.dispatch``), what its
links sent and got (``gateway.link.COUNTS``), and what the app counts itself.

Like the gateway's (``gateway.metrics``), these are plain counters, read into
metrics only for a heartbeat or a scrape. A callback's duration goes into a
fixed-bucket histogram (a bisect and two additions): a callback costs far more.

An app counts its own events with ``app_event("name")`` (the chat counts the
errors it answers, by code). Keep the names few and fixed: each is a label value.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from chatcluster.metrics import Histogram, Snapshot, labelled
from gateway import link
from gateway import protocol as p

if TYPE_CHECKING:
    from businessworker.worker import Worker

KINDS = {p.EVENT_CONNECT: "connect", p.EVENT_MESSAGE: "message", p.EVENT_CLOSE: "close"}
MAX_APP_EVENTS = 100
"""Distinct app event names kept; more are counted as "other" (bounded labels)."""


class WorkerCounts:
    """The counters (the catalogue in ``chatcluster.metrics`` says what each means)."""

    __slots__ = ("app", "closes_made_up", "durations", "events", "exceptions", "gateways_lost")

    def __init__(self) -> None:
        self.events: dict[int, int] = dict.fromkeys(KINDS, 0)
        self.durations: dict[int, Histogram] = {op: Histogram() for op in KINDS}
        self.exceptions = 0
        self.app: Counter[str] = Counter()
        self.gateways_lost = 0
        self.closes_made_up = 0

    def handled(self, op: int, started: float) -> None:
        """An event of kind ``op`` was handled; its callback began at ``started``
        (``time.perf_counter()``)."""
        histogram = self.durations.get(op)
        if histogram is not None:
            self.events[op] += 1
            histogram.observe(time.perf_counter() - started)


COUNTS = WorkerCounts()
STARTED = time.time()


def app_event(name: str) -> None:
    """Count one event of the app's own (``worker_app_events_total{event=name}``)."""
    app = COUNTS.app
    if name not in app and len(app) >= MAX_APP_EVENTS:
        name = "other"
    app[name] += 1


def snapshot(worker: Worker | None = None) -> Snapshot:
    """Every figure of this worker process, by the catalogue's names."""
    c, links = COUNTS, link.COUNTS
    return {
        "process_up_seconds": round(time.time() - STARTED, 1),
        "worker_gateways_linked": len(worker.links) if worker is not None else 0,
        "worker_events_total": [[KINDS[op], n] for op, n in c.events.items()],
        "worker_callback_seconds": [[KINDS[op], h.snapshot()] for op, h in c.durations.items()],
        "worker_callback_exceptions_total": c.exceptions,
        "worker_app_events_total": labelled(c.app),
        "worker_gateways_lost_total": c.gateways_lost,
        "worker_closes_made_up_total": c.closes_made_up,
        "worker_sessions_reset_total": links.resets,
        "worker_commands_total": links.commands,
        "worker_queries_total": links.queries,
        "worker_query_timeouts_total": links.query_timeouts,
        "worker_query_seconds": links.query_seconds.snapshot(),
        "worker_internal_messages_sent_total": links.sent,
        "worker_internal_messages_received_total": links.received,
    }
