"""Logging: one ``key=value`` line per event, and a throttle for lines a peer can repeat."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Hashable

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
LEVELS = ("debug", "info", "warning", "error")


def setup(level: str) -> None:
    """Log to stderr at ``level``; quiet the chatty libraries."""
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=sys.stderr)
    # websockets logs every connection open/close at INFO: far too chatty for a gateway.
    logging.getLogger("websockets").setLevel(logging.WARNING)


class Throttle:
    """At most one line per key (a peer, say) per ``interval``, with the count in between.

    A peer that retries a refused handshake ten times a second would otherwise
    fill the log; an operator still sees it once a minute, with how often.
    """

    def __init__(self, interval: float = 60.0, limit: int = 10_000) -> None:
        self.interval = interval
        self.limit = limit
        self._last: dict[Hashable, tuple[float, int]] = {}

    def hit(self, key: Hashable, now: float | None = None) -> int | None:
        """Count one occurrence; return how many were held back if a line is due, else None."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is None or now - last[0] >= self.interval:
            if last is None and len(self._last) >= self.limit:
                self._forget(now)
            self._last[key] = (now, 0)
            return 0 if last is None else last[1]
        self._last[key] = (last[0], last[1] + 1)
        return None

    def _forget(self, now: float) -> None:
        for key in [k for k, (t, _) in self._last.items() if now - t >= self.interval]:
            del self._last[key]
        if len(self._last) >= self.limit:  # a flood of distinct keys: start over
            self._last.clear()


def held_back(count: int) -> str:
    """The suffix of a throttled line: how many like it were not logged."""
    return f" repeated={count}" if count else ""
