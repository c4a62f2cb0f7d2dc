"""The ZeroMQ settings every internal link shares, and how long a silent peer is waited for.

Liveness of a peer comes from ZMTP heartbeats, which libzmq's own I/O thread
sends and answers: a Python loop that is merely busy keeps its links. A peer
whose process is paused (SIGSTOP, a stalled VM) or cut off by the network stops
answering, and after ``link_timeout`` seconds its links drop:

- a gateway then fences the worker (``gateway.workers``): it hands the worker's
  unacknowledged events to others and refuses whatever that session still sends;
- the register gives a gateway ``LINK_GRACE`` more seconds before dropping it
  (``register.table``); its workers then run on_close for its clients, and the
  gateway, should it come back, learns that it was declared gone and closes its
  clients with 1012 so that they reconnect;
- a worker that finds its own loop was frozen for longer than the timeout
  allows starts new sessions everywhere, acting on nothing it held.

Shorter means a paused worker's clients stall less; longer means a longer pause
(or a slower network) is ridden out without anybody being declared gone.
"""

from __future__ import annotations

import os

import zmq

ENV_LINK_TIMEOUT = "CHAT_LINK_TIMEOUT"
LINK_TIMEOUT = 3.0
"""Seconds without an answer to a ZMTP heartbeat before a link is taken down."""
HEARTBEAT = 1.0
"""Seconds between two signs of life on every internal link: ZMTP heartbeats on a
quiet link, a worker's HELLO on each gateway link, a member's beat to each register."""
SILENCE_EXPIRY = 30.0
"""Seconds a peer may send nothing at all before it is taken for hung: a backstop.
Dead, paused and cut-off peers are found much sooner: ZeroMQ reports a dropped
link at once, and its own heartbeats, answered by libzmq's I/O thread, take a
silent link down within the link timeout. Those never mistake a busy Python loop
for death."""


def link_timeout(given: float | None = None) -> float:
    """--link-timeout, else $CHAT_LINK_TIMEOUT, else LINK_TIMEOUT."""
    if given is not None:
        return given
    env = os.environ.get(ENV_LINK_TIMEOUT)
    return float(env) if env else LINK_TIMEOUT


def heartbeats(sock: zmq.Socket, timeout: float) -> None:
    """ZMTP heartbeats: a ping every HEARTBEAT s, the link down after ``timeout`` s unanswered."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(timeout * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(timeout * 1000))


def unbounded(sock: zmq.Socket) -> None:
    """No high-water mark: our own flow control (acks, flood limits) bounds the queues."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
