"""What a gateway remembers so that each command of an event is carried out once.

A worker tags the commands of each event's run with the event (the prefix of
the gateway it came from, and that gateway's sequence number) and their place
in the run. If the worker is declared gone, the event's gateway hands the
event to another worker, whose run sends the same commands again: a gateway
carries out the command at place i only if fewer than i+1 commands of that
event were carried out here before. So a run that got halfway, and its
replay, together take effect once (for handlers whose commands depend only on
their event and session; see the README's fencing notes).

For its own events a gateway counts in ``WorkerPool.effects`` while the event
is unacknowledged. For other gateways' events it keeps ``Seen``: per source,
a count per sequence number in 2-byte arrays of CHUNK numbers, the newest
``WINDOW`` numbers of each source (2 bytes an event; a replay older than that,
a million events of its gateway later, is no longer recognised).
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Hashable

CHUNK = 4096
WINDOW = 1 << 20
"""Sequence numbers remembered per source (2 MiB once all of them were seen)."""
SOURCES = 256
"""Sources remembered: gateways (one per id prefix) and workers' own runs."""
MAX_COUNT = 0xFFFF


class Seen:
    """How many commands of each (source, seq) were carried out here."""

    __slots__ = ("_sources",)

    def __init__(self) -> None:
        self._sources: OrderedDict[Hashable, dict[int, array[int]]] = OrderedDict()

    def admit(self, source: Hashable, seq: int, index: int) -> bool:
        """True if the command at ``index`` of event ``seq`` of ``source`` is to be carried
        out (and count it); False if it was, from an earlier run of the event."""
        chunks = self._sources.get(source)
        if chunks is None:
            chunks = self._sources[source] = {}
            if len(self._sources) > SOURCES:
                self._sources.popitem(last=False)
        key, at = divmod(seq, CHUNK)
        chunk = chunks.get(key)
        if chunk is None:
            newest = max(chunks, default=key)
            if key < newest - WINDOW // CHUNK:
                return True  # too old to remember: carried out (the documented bound)
            chunk = chunks[key] = array("H", bytes(2 * CHUNK))
            for old in [k for k in chunks if k < max(newest, key) - WINDOW // CHUNK]:
                del chunks[old]
        done = chunk[at]
        if index < done:
            return False
        chunk[at] = min(index + 1, MAX_COUNT)
        return True


KEY_PREFIX = "key:"
"""A CAUSE whose source starts so names an idempotency key, not a worker's run."""
KEY_WINDOW = 600.0
"""Seconds a gateway remembers an idempotency key it carried out commands for."""
KEYS = 200_000
"""Keys remembered at most (the oldest go first beyond it)."""


class Keyed:
    """Commands sent under an idempotency key (``businessworker.cluster``): each place
    of a key's commands is carried out once here while the key is remembered."""

    __slots__ = ("_keys", "limit", "window")

    def __init__(self, window: float = KEY_WINDOW, limit: int = KEYS) -> None:
        self.window = window
        self.limit = limit
        self._keys: OrderedDict[str, list[float]] = OrderedDict()
        """key -> [first seen (monotonic), commands carried out], oldest first"""

    def admit(self, key: str, index: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        keys = self._keys
        while keys:
            first = next(iter(keys.values()))
            if now - first[0] <= self.window and len(keys) <= self.limit:
                break
            keys.popitem(last=False)
        entry = keys.get(key)
        if entry is None:
            keys[key] = [now, index + 1]
            return True
        if index < entry[1]:
            return False
        entry[1] = index + 1
        return True
