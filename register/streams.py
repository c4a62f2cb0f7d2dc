"""Group streams: one order and a bounded history for the groups that keep one.

The register is the sequencer (see README, "Streams"). A gateway hands it each
message for a history group as [PUBLISH, gateway_id, n, ...], numbered per
gateway; the register gives it the group's next offset, keeps it while the
group's bounds allow, and sends it to every gateway. Every member on every
gateway therefore sees the group's messages in the register's order.

A position is (epoch, offset). The epoch is the id of the register that
sequenced it: a register that restarts has lost its history, so positions of
another epoch cannot be served and recovery from them is refused, never served
in part.

This is the core, kept apart from I/O: ``register.server`` feeds it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_COUNT = 10_000
"""Upper bound on the messages one group keeps, whatever the app asks."""
MAX_SECONDS = 24 * 3600.0


@dataclass(slots=True)
class Entry:
    offset: int
    at: float
    data: str | bytes
    exclude: list[int]
    source: str
    n: int


@dataclass(slots=True)
class Stream:
    """One group's stream: the last offset given and what is kept of it."""

    epoch: str = ""
    last: int = 0
    count: int = 200
    seconds: float = 300.0
    kept: deque[Entry] = field(default_factory=deque)
    bytes: int = 0

    def trim(self, now: float) -> None:
        kept = self.kept
        horizon = now - self.seconds
        while kept and (len(kept) > self.count or kept[0].at < horizon):
            self.bytes -= len(kept.popleft().data)


class Streams:
    """Every history group's stream, and the publishes already taken per gateway."""

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.streams: dict[str, Stream] = {}
        self.taken: dict[str, int] = {}
        """gateway id -> number of its last publish taken (they are taken in order)"""

    def publish(
        self,
        source: str,
        n: int,
        first: int,
        group: str,
        data: str | bytes,
        exclude: list[int],
        count: int,
        seconds: float,
        now: float,
    ) -> Entry | None:
        """Give a gateway's n-th publish its offset; None if taken already or out of turn.

        A gateway sends its publishes in order and sends the unconfirmed ones
        again until it sees them come back, each with ``first``, its oldest
        unconfirmed one. So a publish is taken only if it is the next one of its
        gateway: a repeat is dropped, and one after a lost one waits for the
        lost one's resend. A gateway never heard of (this register is new)
        resumes at ``first``; the gateway's own dedup drops what an earlier
        register had taken already.
        """
        last = self.taken.get(source, 0)
        if first > last + 1:
            last = first - 1
        if n != last + 1:
            self.taken[source] = last
            return None
        self.taken[source] = n
        stream = self.streams.get(group)
        if stream is None:
            stream = self.streams[group] = Stream(self.epoch)
        stream.count = max(1, min(int(count), MAX_COUNT))
        stream.seconds = max(0.0, min(float(seconds), MAX_SECONDS))
        stream.last += 1
        entry = Entry(stream.last, now, data, exclude, source, n)
        stream.kept.append(entry)
        stream.bytes += len(data)
        stream.trim(now)
        return entry

    def position(self, group: str) -> tuple[str, int]:
        stream = self.streams.get(group)
        return (self.epoch, 0) if stream is None else (stream.epoch, stream.last)

    def since(self, group: str, epoch: str, offset: int, now: float) -> list[Entry] | None:
        """Every message of ``group`` after (epoch, offset), or None if any is gone.

        All or nothing: None when the epoch is another (this register restarted
        since), when the offset was never given, or when the bounds already let
        the first missed message go.
        """
        stream = self.streams.get(group)
        if stream is None:
            return [] if offset == 0 and epoch == self.epoch else None
        if epoch != stream.epoch or offset < 0:
            return None
        if offset > stream.last:
            return None
        stream.trim(now)
        kept = stream.kept
        if offset == stream.last:
            return []
        if not kept or kept[0].offset > offset + 1:
            return None
        start = offset + 1 - kept[0].offset
        return [kept[i] for i in range(start, len(kept))]

    def forget_gateway(self, source: str) -> None:
        self.taken.pop(source, None)

    def stats(self) -> dict[str, Any]:
        return {
            "groups": len(self.streams),
            "messages": sum(len(s.kept) for s in self.streams.values()),
            "bytes": sum(s.bytes for s in self.streams.values()),
        }
