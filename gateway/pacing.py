"""When a gateway's queued events leave for its workers: at the end of the loop
turn, at most once a millisecond.

A gateway queues what one loop turn produces for each worker and sends it as
one ZeroMQ message. Each message costs far more than its bytes: libzmq hands it
to its I/O thread, which must be woken, and the worker's I/O thread wakes the
worker's loop in turn. Measured on this 2-core VM, waking a sleeping thread
costs the waker about 12 us and a lone send 15-19 us of CPU; under a stream of
small events (one per loop turn, as when new connections arrive) that is most
of what an event costs.

So while the gateway sent less than ``PACE`` ago, what it queues waits until
``PACE`` has passed, and leaves together (Nagle's idea, or Kafka's
``linger.ms``). A gateway that has been quiet sends at the end of the turn, as
before: an isolated event is not delayed at all, one in a busy stream by 1 ms
at most. Measured (runs of ``make bench`` in the same hour): handshakes 2,500
-> 4,200-4,500/s per gateway, private messages 470 -> 355 us of server CPU
each, their median latency 1.5 -> 2.9 ms.

Workers do not pace their side: doing so saved little more CPU and gave
private messages a p99 of 55-69 ms. That was measured while the workers' query
timers still kept every request alive for 15 s (long garbage-collector pauses,
fixed since), and has not been measured again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

PACE = 0.001
"""Seconds between two sends on one link while it is busy. libuv's timers count
whole milliseconds, so a shorter pace would mean none."""


class Pacer:
    """Schedules ``flush`` for the end of this loop turn, or ``PACE`` after the last send."""

    __slots__ = ("_flush", "_last_sent", "_scheduled", "pace")

    def __init__(self, flush: Callable[[], None], pace: float = PACE) -> None:
        self._flush = flush
        self.pace = pace
        self._scheduled = False
        self._last_sent = float("-inf")

    def schedule(self) -> None:
        """Something was queued: make sure a flush will run."""
        if self._scheduled:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        wait = self._last_sent + self.pace - loop.time()
        if wait > 0:
            loop.call_later(wait, self._run)
        else:
            loop.call_soon(self._run)

    def sent(self) -> None:
        """The owner sent a message (from a scheduled flush or a direct one)."""
        self._last_sent = asyncio.get_running_loop().time()

    def _run(self) -> None:
        self._scheduled = False
        self._flush()
