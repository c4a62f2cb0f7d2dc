"""A worker's links to every gateway, kept in step with the register(s).

The register pushes its table of gateways; this module opens a link to each
new gateway and maps every id prefix to its link, so turning a client id into
its gateway is one dict lookup.

A gateway is unlinked only when it is gone from every register's table and at
least one register is "settled" (up long enough to have heard from every live
gateway). So a register restart, which briefly shows an empty table, never
cuts a link that carries traffic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq.asyncio

from chatcluster.cli import zmq_address_error
from chatcluster.keys import Keys
from chatcluster.logs import Throttle, held_back
from gateway.client import EventHandler, GatewayLink
from gateway.ids import prefix_of

log = logging.getLogger("businessworker.links")

STALE_REGISTER = 30.0
"""A register silent this long no longer vouches for the gateways it listed,
as long as another register is alive."""


class GatewayLinks:
    """Every gateway link of this worker, by gateway id and by client id prefix."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        worker_id: str,
        hello: Callable[[], list[Any]],
        on_event: EventHandler,
        keys: Keys | None = None,
        on_gone: Callable[[GatewayLink], None] | None = None,
    ) -> None:
        self.on_gone = on_gone
        self.ctx = ctx
        self.keys = keys
        self.worker_id = worker_id
        self.hello = hello
        self.on_event = on_event
        self.links: dict[str, GatewayLink] = {}
        self.by_prefix: dict[int, GatewayLink] = {}
        self._tables: dict[int, tuple[float, bool, dict[str, dict[str, Any]]]] = {}
        self._unreachable = Throttle()

    def __len__(self) -> int:
        return len(self.links)

    def all(self) -> list[GatewayLink]:
        return list(self.links.values())

    def for_client(self, client_id: int) -> GatewayLink | None:
        return self.by_prefix.get(prefix_of(int(client_id)))

    def group_by_link(self, client_ids: list[int]) -> dict[GatewayLink, list[int]]:
        grouped: dict[GatewayLink, list[int]] = {}
        for cid in client_ids:
            link = self.by_prefix.get(prefix_of(cid))
            if link is not None:
                grouped.setdefault(link, []).append(cid)
        return grouped

    def broadcast(self, frame: bytes) -> None:
        """Send one already-encoded command to every gateway."""
        for link in self.links.values():
            link.send_frame(frame)

    def heard_from(self, register: int) -> None:
        if register in self._tables:
            _, settled, entries = self._tables[register]
            self._tables[register] = (time.monotonic(), settled, entries)

    def update(self, register: int, settled: bool, entries: list[dict[str, Any]]) -> None:
        """A register sent its table: link new gateways, unlink vanished ones."""
        self._tables[register] = (time.monotonic(), settled, {e["id"]: e for e in entries})
        self._reconcile()

    def _reconcile(self) -> None:
        now = time.monotonic()
        tables = list(self._tables.values())
        fresh = [t for t in tables if now - t[0] < STALE_REGISTER] or tables
        listed: dict[str, dict[str, Any]] = {}
        for _, _, entries in fresh:
            listed.update(entries)
        for gid, entry in listed.items():
            link = self.links.get(gid)
            if link is None or link.address != entry["address"]:
                if link is not None:
                    self._unlink(gid)
                self._link(entry)
            else:
                for prefix in entry["prefixes"]:
                    self.by_prefix[prefix] = link
        if any(settled for _, settled, _ in fresh):
            for gid in [g for g in self.links if g not in listed]:
                link = self._unlink(gid)
                if self.on_gone is not None:
                    self.on_gone(link)

    def _link(self, entry: dict[str, Any]) -> None:
        why = zmq_address_error(entry["address"])
        if why is not None:  # a gateway's bad --advertise must not stop the worker
            shown = self._unreachable.hit(entry["id"])
            if shown is not None:
                log.error(
                    "cannot link gateway=%s: it advertises %s (fix that gateway's --advertise)%s",
                    entry["id"],
                    why,
                    held_back(shown),
                )
            return
        link = GatewayLink(
            self.ctx, entry["id"], entry["address"], self.worker_id, self.on_event, self.keys
        )
        self.links[entry["id"]] = link
        for prefix in entry["prefixes"]:
            self.by_prefix[prefix] = link
        link.start(self.hello())
        log.info("linked gateway=%s address=%s", entry["id"], entry["address"])

    def _unlink(self, gid: str) -> GatewayLink:
        link = self.links.pop(gid)
        for prefix in [p for p, lk in self.by_prefix.items() if lk is link]:
            del self.by_prefix[prefix]
        link.close()
        log.info("unlinked gateway=%s", gid)
        return link

    def close(self) -> None:
        for gid in list(self.links):
            self._unlink(gid)
