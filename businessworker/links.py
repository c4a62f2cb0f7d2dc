"""A worker's links to every gateway, kept in step with the register(s).

The register pushes its table of gateways; this module opens a link to each
new gateway and maps every id prefix to its link, so turning a client id into
its gateway is one dict lookup.

A gateway is unlinked only when it is gone from every register's table and at
least one register is "settled" (up long enough to have heard from every live
gateway). So a register restart, which briefly shows an empty table, never
cuts a link that carries traffic.

The links also watch this worker's own loop: one that was frozen (the process
paused, a VM stalled, a callback that blocked the loop) for longer than the
gateways wait for a silent link may have been declared gone by them. Before
anything leaves after such a freeze, every link starts a new session and
everything held is dropped (the gateways replay it elsewhere), so that a
worker that wakes up never acts on events that were taken from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq.asyncio

from chatcluster import links as timing
from chatcluster.cli import zmq_address_error
from chatcluster.keys import Keys
from chatcluster.logs import Throttle, held_back
from gateway import protocol as p
from gateway.ids import prefix_of
from gateway.link import EventHandler, GatewayLink, Run

log = logging.getLogger("businessworker.links")

STALE_REGISTER = 30.0
"""A register silent this long no longer vouches for the gateways it listed,
as long as another register is alive."""
TICK = 0.25
"""Seconds between two ticks of the freeze watch."""
FREEZE_MARGIN = 0.5
"""A freeze this much shorter than the link timeout is already taken for one that
the gateways may have noticed."""
GONE_KEPT = 1000
"""Ids of gateways this worker ran on_close for, remembered (see ``hello``)."""


class GatewayLinks:
    """Every gateway link of this worker, by gateway id and by client id prefix."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        worker_id: str,
        info: Callable[[], dict[str, Any]],
        on_event: EventHandler,
        keys: Keys | None = None,
        on_gone: Callable[[GatewayLink], None] | None = None,
        on_reset: Callable[[GatewayLink], None] | None = None,
        link_timeout: float = timing.LINK_TIMEOUT,
    ) -> None:
        self.on_gone = on_gone
        self.on_reset = on_reset
        self.ctx = ctx
        self.keys = keys
        self.worker_id = worker_id
        self.info = info
        self.on_event = on_event
        self.link_timeout = link_timeout
        self.links: dict[str, GatewayLink] = {}
        self.by_prefix: dict[int, GatewayLink] = {}
        self._tables: dict[int, tuple[float, bool, dict[str, dict[str, Any]]]] = {}
        self.gone: dict[str, float] = {}
        """gateways declared gone (we ran on_close for their clients) -> when (monotonic)"""
        self.linked_at = 0.0
        """when the newest link was made (monotonic)"""
        self.last_tick = time.monotonic()
        self._own_run: Run | None = None
        self._own_seq = 0
        self._ticker: asyncio.TimerHandle | None = None
        self._decode = p.SessionDecoder()
        self._last_sessions: tuple[list[Any], dict[int, dict[str, Any]]] | None = None
        """the last sessions answers, decoded (shared answers are told by identity)"""

    def hello(self, link: GatewayLink) -> list[Any]:
        """A session's HELLO: which gateway we mean, and whether we took it for gone."""
        info = {**self.info(), "gateway": link.gateway_id}
        if link.gateway_id in self.gone:
            info["gone"] = True
        return [p.HELLO, self.worker_id, info]

    # The freeze watch

    def start(self) -> None:
        """Tick on the loop; a late tick (or a send long after the last one) is a freeze."""
        self.last_tick = time.monotonic()
        self._ticker = asyncio.get_running_loop().call_later(TICK, self._tick)

    def _tick(self) -> None:
        self.frozen()
        self._ticker = asyncio.get_running_loop().call_later(TICK, self._tick)

    def frozen(self) -> bool:
        """True, after starting every session anew, if the loop stood still too long."""
        now = time.monotonic()
        stood = now - self.last_tick - TICK
        self.last_tick = now
        if stood < self.link_timeout - FREEZE_MARGIN:
            return False
        log.warning(
            "this worker's loop stood still for %.1f s (paused, or a callback blocked it): "
            "dropping what it held, new sessions with every gateway",
            stood,
        )
        links = list(self.links.values())
        for link in links:
            link.begin_reset()
        for link in links:
            link.finish_reset()
        return True

    def own_run(self) -> Run:
        """The run of commands no client event caused, one per loop turn."""
        run = self._own_run
        if run is None:
            self._own_seq += 1
            run = self._own_run = Run(self.worker_id, self._own_seq, None)
            asyncio.get_running_loop().call_soon(self._end_own_run)
        return run

    def _end_own_run(self) -> None:
        self._own_run = None
        self._unreachable = Throttle()

    def __len__(self) -> int:
        return len(self.links)

    def all(self) -> list[GatewayLink]:
        return list(self.links.values())

    def for_client(self, client_id: int) -> GatewayLink | None:
        return self.by_prefix.get(prefix_of(int(client_id)))

    def send_to_client(self, client_id: int, frame: bytes, run: Run) -> bool:
        """Queue a command on the link of the client's gateway; False if none is linked."""
        link = self.by_prefix.get(prefix_of(int(client_id)))
        if link is None:
            return False
        link.send_frame(frame, run)
        return True

    def publisher_for(self, run: Run) -> GatewayLink | None:
        """The gateway that hands a history group's message to the stream register:
        the one whose event ``run`` is handling (so the message follows the event's
        own order), else any linked one."""
        link = run.link
        if link is not None and self.links.get(link.gateway_id) is link:
            return link
        return next(iter(self.links.values()), None)

    # Queries: the wire side of ``businessworker.api``'s getters

    async def ask(self, client_id: int, kind: str, offline: Any) -> Any:
        """Ask the client's gateway; ``offline`` if none is linked."""
        link = self.by_prefix.get(prefix_of(int(client_id)))
        if link is None:
            return offline
        return await link.query(kind, int(client_id))

    async def ask_all(self, kind: str, *args: Any) -> list[Any]:
        """Ask every gateway; one that does not answer in time counts as empty (None)."""
        links = list(self.links.values())
        if not links:
            return []
        answers = await asyncio.gather(
            *(link.query(kind, *args) for link in links), return_exceptions=True
        )
        return [None if isinstance(a, BaseException) else a for a in answers]

    def session(self, packed: bytes) -> dict[str, Any]:
        """A packed session as a dict of the caller's own (each distinct one decoded once)."""
        return self._decode(packed)

    def sessions(self, answers: list[Any]) -> dict[int, dict[str, Any]]:
        """{client id: session}, in client id order, from every gateway's [[id, packed], ...].

        Callers who shared one request (``GatewayLink.query`` shares identical
        ones) got the same answer objects: the first decodes and sorts them,
        the others only copy.
        """
        last = self._last_sessions
        if (
            last is not None
            and len(last[0]) == len(answers)
            and all(a is b for a, b in zip(last[0], answers, strict=True))
        ):
            shared = last[1]
        else:
            pairs = concat(answers)
            pairs.sort(key=_first)
            shared = self._decode.shared_pairs(pairs)
            self._last_sessions = (answers, shared)
        return {cid: session.copy() for cid, session in shared.items()}

    def group_by_link(self, client_ids: list[int]) -> dict[GatewayLink, list[int]]:
        grouped: dict[GatewayLink, list[int]] = {}
        for cid in client_ids:
            link = self.by_prefix.get(prefix_of(cid))
            if link is not None:
                grouped.setdefault(link, []).append(cid)
        return grouped

    def broadcast(self, frame: bytes, run: Run) -> None:
        """Send one already-encoded command to every gateway."""
        for link in self.links.values():
            link.send_frame(frame, run)

    def heartbeat(self) -> None:
        """A HELLO on every link: the gateways' sign of life from this worker."""
        for link in self.links.values():
            link.control(p.pack(self.hello(link)))

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
                self.gone[gid] = time.monotonic()
                if len(self.gone) > GONE_KEPT:
                    del self.gone[next(iter(self.gone))]
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
            self.ctx,
            entry["id"],
            entry["address"],
            self.worker_id,
            self.on_event,
            self.keys,
            hello=self.hello,
            on_reset=self.on_reset,
            guard=self.frozen_since_last_tick,
            link_timeout=self.link_timeout,
        )
        self.links[entry["id"]] = link
        self.linked_at = time.monotonic()
        for prefix in entry["prefixes"]:
            self.by_prefix[prefix] = link
        link.start()
        log.info("linked gateway=%s address=%s", entry["id"], entry["address"])

    def _unlink(self, gid: str) -> GatewayLink:
        link = self.links.pop(gid)
        for prefix in [x for x, lk in self.by_prefix.items() if lk is link]:
            del self.by_prefix[prefix]
        link.close()
        log.info("unlinked gateway=%s", gid)
        return link

    def frozen_since_last_tick(self) -> bool:
        """The guard of every send: cheap unless the last tick is long past."""
        if time.monotonic() - self.last_tick - TICK < self.link_timeout - FREEZE_MARGIN:
            return False
        return self.frozen()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for gid in list(self.links):
            self._unlink(gid)


def concat(answers: list[Any]) -> list[Any]:
    """Every gateway's list answer as one list (a missing answer adds nothing)."""
    return [item for answer in answers if answer for item in answer]


def _first(pair: list[Any]) -> Any:
    return pair[0]
