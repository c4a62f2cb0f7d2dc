"""Group streams: one order and a bounded history for the groups that keep one.

The register is the sequencer (see README, "Streams"). A gateway hands it each
message for a history group as [PUBLISH, gateway_id, n, ...], numbered per
gateway; the register gives it the group's next offset, keeps it while the
group's bounds allow, and sends it to every gateway. Every member on every
gateway therefore sees the group's messages in the register's order.

A position is (epoch, offset). The epoch names the register that sequenced it
and the stream's making there: a register that restarts has lost its history,
and a stream forgotten (all aged out, or evicted under MAX_BYTES) and made again
starts over, so positions of another epoch cannot be served and recovery from
them is refused, never served in part.

This is the core, kept apart from I/O: ``register.server`` feeds it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

MAX_COUNT = 10_000
"""Upper bound on the messages one group keeps, whatever the app asks."""
MAX_SECONDS = 24 * 3600.0
MAX_BYTES = 256 * 1024 * 1024
"""Bytes of messages kept in all; beyond it the groups least lately written to are
forgotten whole (clients may make rooms without end)."""


@dataclass(slots=True)
class Entry:
    offset: int
    at: float
    data: str | bytes
    exclude: list[int]
    source: str
    n: int
    before: list[Any] | None = None
    """[epoch, offset] where another register had sequenced it (sent again since)"""


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
        self.streams: OrderedDict[str, Stream] = OrderedDict()
        """least lately written to first"""
        self.bytes = 0
        self._made = 0
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
        before: list[Any] | None = None,
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
            # Each stream its own epoch: one forgotten and made again is another stream.
            self._made += 1
            stream = self.streams[group] = Stream(f"{self.epoch}.{self._made}")
        else:
            self.streams.move_to_end(group)
        stream.count = max(1, min(int(count), MAX_COUNT))
        stream.seconds = max(0.0, min(float(seconds), MAX_SECONDS))
        stream.last += 1
        entry = Entry(stream.last, now, data, exclude, source, n, before)
        before = stream.bytes
        stream.kept.append(entry)
        stream.bytes += len(data)
        stream.trim(now)
        self.bytes += stream.bytes - before
        while self.bytes > MAX_BYTES and len(self.streams) > 1:
            _, oldest = self.streams.popitem(last=False)
            self.bytes -= oldest.bytes
        return entry

    def expire(self, now: float) -> None:
        """Forget the streams whose every message aged out (call now and then)."""
        gone = [
            group
            for group, stream in self.streams.items()
            if not stream.kept or stream.kept[-1].at < now - stream.seconds
        ]
        for group in gone:
            self.bytes -= self.streams.pop(group).bytes

    def position(self, group: str) -> tuple[str, int]:
        stream = self.streams.get(group)
        return ("", 0) if stream is None else (stream.epoch, stream.last)

    def since(self, group: str, epoch: str, offset: int, now: float) -> list[Entry] | None:
        """Every message of ``group`` after (epoch, offset), or None if any is gone.

        All or nothing: None when the epoch is another (this register restarted
        since), when the offset was never given, or when the bounds already let
        the first missed message go.
        """
        stream = self.streams.get(group)
        if stream is None or epoch != stream.epoch or offset < 0:
            return None
        if offset > stream.last:
            return None
        before = stream.bytes
        stream.trim(now)
        self.bytes -= before - stream.bytes
        kept = stream.kept
        if offset == stream.last:
            return []
        if not kept or kept[0].offset > offset + 1:
            return None
        start = offset + 1 - kept[0].offset
        return [kept[i] for i in range(start, len(kept))]

    def positions(self) -> list[list[Any]]:
        """[group, epoch, last offset] of every stream."""
        return [[group, st.epoch, st.last] for group, st in self.streams.items()]

    def forget_gateway(self, source: str) -> None:
        self.taken.pop(source, None)

    def stats(self) -> dict[str, Any]:
        return {
            "groups": len(self.streams),
            "messages": sum(len(s.kept) for s in self.streams.values()),
            "bytes": self.bytes,
        }
