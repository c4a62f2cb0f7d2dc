"""Client ids: unique across the cluster, never reused, below 2**53.

    client_id = prefix << COUNTER_BITS | counter

The prefix names the gateway: the register maps each prefix to the gateway
that claimed it, so a worker finds a client's gateway with one dict lookup and
no question to anybody. A gateway claims as prefix the number of seconds since
``EPOCH`` when it starts (31 bits last until 2094); if that prefix is taken by
another live gateway (two gateways started in the same second), the register
says so and the gateway claims the next free one. Time only moves forward, so a
restarted gateway never gets the prefix of an earlier one, and a gateway whose
counter runs out (4 million connections) simply claims a fresh prefix.

53 bits keep the id exact as a JSON number, which the chat shows as ``uid``.
"""

from __future__ import annotations

import time

COUNTER_BITS = 22
PREFIX_BITS = 31
EPOCH = 1767225600  # 2026-01-01T00:00:00Z
MAX_COUNTER = (1 << COUNTER_BITS) - 1


def prefix_of(client_id: int) -> int:
    return client_id >> COUNTER_BITS


def make(prefix: int, counter: int) -> int:
    if not 0 < counter <= MAX_COUNTER:
        raise ValueError("counter out of range")
    if not 0 <= prefix < 1 << PREFIX_BITS:
        raise ValueError("prefix out of range")
    return prefix << COUNTER_BITS | counter


def fresh_prefix(after: int = 0) -> int:
    """A prefix claim for now: the current second, or later than ``after``."""
    return max(int(time.time()) - EPOCH, after + 1)


class IdAllocator:
    """Hands out the ids of one gateway; switches prefix when the counter runs out."""

    __slots__ = ("counter", "prefix", "retired")

    def __init__(self, prefix: int) -> None:
        self.prefix = prefix
        self.counter = 0
        self.retired: list[int] = []

    def next(self) -> int:
        if self.counter == MAX_COUNTER:
            self.renew()
        self.counter += 1
        return make(self.prefix, self.counter)

    def renew(self, after: int | None = None) -> None:
        """Move to a new prefix (counter exhausted, or the register refused ours).

        The old prefix stays listed while ids under it may be live; one that
        named no client yet is simply dropped.
        """
        if self.counter:
            self.retired.append(self.prefix)
        self.prefix = fresh_prefix(max(self.prefix, after or 0))
        self.counter = 0

    @property
    def prefixes(self) -> list[int]:
        """Every prefix that may still name a live client here, current one last."""
        return [*self.retired, self.prefix]
