"""The cluster as one scrape target: the register renders every member's figures.

Gateways and workers send a snapshot of their counters with each heartbeat (the
``metrics`` key of their entry, taken out before the entry reaches the table, so
workers are never sent it). The register keeps the latest per member and, at
each scrape of its ``--metrics`` endpoint, renders them all with ``role`` and
``id`` labels (the id ``python -m register status`` shows), with its own
figures under ``role="register"``. A member that leaves the table (goodbye,
dropped) leaves the output with it. ``/health`` says whether the cluster can
serve a chat: at least one gateway with at least one worker linked.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from chatcluster.metrics import Snapshot, SnapshotCollector, exposition, labelled

if TYPE_CHECKING:
    from register.server import Register

ROLES = ("gateway", "worker", "publisher")
REASONS = ("takeover", "prefix", "gone", "handshake")


class RegisterFigures:
    """The register's own counters and the members' latest snapshots."""

    def __init__(self, register: Register) -> None:
        self.register = register
        self.started = time.time()
        self.members: dict[str, Snapshot] = {}
        """member id -> its latest snapshot"""
        self.joins: Counter[str] = Counter(dict.fromkeys(ROLES[:2], 0))
        self.leaves: Counter[str] = Counter(dict.fromkeys(ROLES[:2], 0))
        self.drops: Counter[str] = Counter(dict.fromkeys(ROLES[:2], 0))
        self.refusals: Counter[str] = Counter(dict.fromkeys(REASONS, 0))

    def take(self, entry: dict[str, Any]) -> None:
        """Keep the snapshot a heartbeat carries; take it out of the entry."""
        figures = entry.pop("metrics", None)
        if isinstance(figures, dict):
            self.members[entry["id"]] = figures

    def snapshot(self) -> Snapshot:
        table = self.register.table
        members = Counter(dict.fromkeys(ROLES, 0))
        members["gateway"] = len(table.gateways)
        for member in table.workers.values():
            members[member.entry.get("role", "worker")] += 1
        return {
            "process_up_seconds": round(time.time() - self.started, 1),
            "register_members": labelled(members),
            "register_joins_total": labelled(self.joins),
            "register_leaves_total": labelled(self.leaves),
            "register_drops_total": labelled(self.drops),
            "register_refusals_total": labelled(self.refusals),
            "register_stream_sends_total": self.register.stream_sends,
        }

    def sources(self) -> list[tuple[tuple[str, ...], Snapshot]]:
        """Every live member's snapshot with its labels, the register's first."""
        table = self.register.table
        out: list[tuple[tuple[str, ...], Snapshot]] = [
            (("register", self.register.id), self.snapshot())
        ]
        live: set[str] = set()
        for gid in table.gateways:
            live.add(gid)
            if gid in self.members:
                out.append((("gateway", gid), self.members[gid]))
        for wid, member in table.workers.items():
            live.add(wid)
            if wid in self.members:
                out.append(((member.entry.get("role", "worker"), wid), self.members[wid]))
        for gone in [m for m in self.members if m not in live]:
            del self.members[gone]
        return out

    def render(self) -> bytes:
        """The Prometheus text of the whole cluster."""
        return exposition(SnapshotCollector(self.sources))

    def health(self) -> tuple[bool, str]:
        """(True, "ok: ...") while a gateway has a worker linked; else why not."""
        table = self.register.table
        gateways = table.gateway_entries()
        workers = [e for e in table.worker_entries() if e.get("role", "worker") == "worker"]
        counts = f"{len(gateways)} gateways, {len(workers)} workers"
        if not gateways:
            return False, f"no gateway ({counts})"
        if not workers:
            return False, f"no worker linked ({counts})"
        if not any(g.get("workers", 0) > 0 for g in gateways):
            return False, f"no gateway has a worker linked yet ({counts})"
        return True, f"ok: {counts}"
