"""The register's table of live gateways and workers.

Pure data, no sockets: the server feeds it heartbeats and the clock, and asks it
what changed. Kept apart so that its rules (expiry, prefix ownership) are tested
without processes.

Prefix ownership: a gateway's client ids start with a prefix it claims (see
``gateway.ids``). Two live gateways must never share one. The first gateway to
hold a prefix keeps it while it lives; a later claim of the same prefix (two
gateways started in the same second) is refused and the newcomer claims another
before it takes any client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GONE_KEPT = 24 * 3600.0
"""Seconds a dropped gateway's id is remembered (to tell it GONE should it come back)."""


@dataclass(slots=True)
class Member:
    entry: dict[str, Any]
    last_seen: float
    link_lost: float | None = None
    """when its link dropped (None: linked); cleared by its next beat"""


@dataclass(slots=True)
class Table:
    expiry: float
    grace: float = 2.0
    gateways: dict[str, Member] = field(default_factory=dict)
    workers: dict[str, Member] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)
    """prefix -> id of the gateway that owns it"""
    version: int = 0
    """Bumped whenever the set of gateways or their addresses/prefixes change."""
    gone: dict[str, float] = field(default_factory=dict)
    """ids of gateways dropped without a goodbye -> when (told GONE if they beat again)"""

    def takeover(self, entry: dict[str, Any]) -> bool:
        """True when ``entry`` claims a listed gateway's id with another address.

        A gateway's id is random per start and its address never changes, so
        such a claim is an impostor (or a bug): the listed gateway keeps its id,
        and its workers keep their links.
        """
        listed = self.gateways.get(entry["id"])
        return listed is not None and listed.entry["address"] != entry["address"]

    def gateway_seen(self, entry: dict[str, Any], now: float) -> list[int]:
        """Record a gateway heartbeat; return the prefixes it may not use."""
        gid = entry["id"]
        refused = [p for p in entry["prefixes"] if not self._may_own(p, entry)]
        accepted = [p for p in entry["prefixes"] if p not in refused]
        for prefix in accepted:
            self.owners[prefix] = gid
        entry = {**entry, "prefixes": accepted}
        old = self.gateways.get(gid)
        if old is None or _route(old.entry) != _route(entry):
            self.version += 1
        if old is not None:
            for prefix in old.entry["prefixes"]:
                if prefix not in accepted and self.owners.get(prefix) == gid:
                    del self.owners[prefix]
        self.gateways[gid] = Member(entry, now)
        return refused

    def worker_seen(self, entry: dict[str, Any], now: float) -> bool:
        """Record a worker heartbeat; True when the worker is new to this table."""
        known = entry["id"] in self.workers
        self.workers[entry["id"]] = Member(entry, now)
        return not known

    def link_lost(self, member_id: str, now: float) -> None:
        """Its link dropped: dropped itself unless it beats again within ``grace``."""
        member = self.gateways.get(member_id) or self.workers.get(member_id)
        if member is not None and member.link_lost is None:
            member.link_lost = now

    def forget(self, member_id: str) -> None:
        """Drop a gateway or worker that said goodbye."""
        if member_id in self.gateways:
            self._drop_gateway(member_id)
        self.workers.pop(member_id, None)

    def expire(self, now: float) -> list[str]:
        """Drop the members gone (link lost, no beat since) or silent too long; gateway ids."""
        dead = [g for g, m in self.gateways.items() if self._gone(m, now)]
        for gid in dead:
            self._drop_gateway(gid)
            self.gone[gid] = now
        for gid in [g for g, t in self.gone.items() if now - t > GONE_KEPT]:
            del self.gone[gid]
        for wid in [w for w, m in self.workers.items() if self._gone(m, now)]:
            del self.workers[wid]
        return dead

    def _gone(self, member: Member, now: float) -> bool:
        if now - member.last_seen > self.expiry:
            return True
        lost = member.link_lost
        return lost is not None and member.last_seen < lost and now - lost > self.grace

    def gateway_entries(self) -> list[dict[str, Any]]:
        return [m.entry for m in self.gateways.values()]

    def worker_entries(self) -> list[dict[str, Any]]:
        return [m.entry for m in self.workers.values()]

    def _may_own(self, prefix: int, entry: dict[str, Any]) -> bool:
        holder = self.owners.get(prefix)
        return holder is None or holder == entry["id"]

    def _drop_gateway(self, gid: str) -> None:
        member = self.gateways.pop(gid)
        for prefix in member.entry["prefixes"]:
            if self.owners.get(prefix) == gid:
                del self.owners[prefix]
        self.version += 1


def _route(entry: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
    """The part of an entry that workers route by; the rest (counts) changes every beat."""
    return entry["address"], tuple(entry["prefixes"])
