"""The small client that gateways and workers use to talk to the register(s).

It beats to every register address it was given (several for redundancy) and
hands each answer to the owner with the index of the register that sent it.
ZeroMQ reconnects by itself, so a restarted register simply starts hearing the
beats again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from chatcluster import auth, links
from chatcluster.cli import USAGE, OperatorError, zmq_address_error
from chatcluster.keys import Keys
from register import protocol

log = logging.getLogger("register.client")

ENV_REGISTER = "CHAT_REGISTER"
"""Comma-separated register addresses, when no --register option is given."""
SILENCE_WARN = 5.0
"""Seconds without an answer from any register before a warning ..."""
SILENCE_REPEAT = 30.0
"""... and between two such warnings."""


def register_addresses(given: Sequence[str] | None) -> list[str]:
    """The --register options, else $CHAT_REGISTER, else the default address.

    An address in $CHAT_REGISTER that is none is a usage error (the options are
    checked by the parser).
    """
    if given:
        return list(given)
    env = os.environ.get(ENV_REGISTER, "")
    addresses = [a.strip() for a in env.split(",") if a.strip()]
    for address in addresses:
        why = zmq_address_error(address)
        if why is not None:
            raise OperatorError(f"${ENV_REGISTER}: {why} (comma-separated)", USAGE)
    return addresses or [protocol.DEFAULT_ADDRESS]


class RegisterClient:
    """Heartbeats to every register and delivers their answers to ``on_message``."""

    def __init__(
        self,
        addresses: Sequence[str],
        beat: Callable[[], list[Any]],
        on_message: Callable[[int, list[Any]], None],
        *,
        ctx: zmq.asyncio.Context | None = None,
        interval: float = protocol.HEARTBEAT,
        keys: Keys | None = None,
        link_timeout: float = links.LINK_TIMEOUT,
    ) -> None:
        self.link_timeout = link_timeout
        self.keys = keys
        if not addresses:
            raise ValueError("at least one register address is needed")
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.addresses = list(addresses)
        self.beat = beat
        self.on_message = on_message
        self.interval = interval
        self._socks: list[zmq.asyncio.Socket] = []
        self._sync: list[zmq.Socket] = []
        self._wake = asyncio.Event()
        self._watchers: list[auth.ClientWatch] = []
        self.last_answer = time.monotonic()
        """when a register last answered (start-up counts as one)"""
        self._warned_at: float | None = None

    def beat_now(self) -> None:
        """Send a heartbeat at once instead of at the next tick (after a change)."""
        self._wake.set()

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        for address in self.addresses:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            links.heartbeats(sock, self.link_timeout)
            if self.keys is not None:
                self.keys.client(sock)
            self._watchers.append(
                auth.ClientWatch(sock, f"register {address}", self.keys is not None)
            )
            sock.connect(address)
            self._socks.append(sock)
            self._sync.append(zmq.Socket.shadow(sock.underlying))
            poller.register(sock, zmq.POLLIN)
        index = {sock: i for i, sock in enumerate(self._socks)}
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat or self._wake.is_set():
                self._wake.clear()
                self._send_all(self.beat())
                next_beat = now + self.interval
                self._warn_if_silent(now)
            timeout = max(0.0, min(next_beat - time.monotonic(), self.interval))
            ready = await poller.poll(timeout * 1000)
            for sock, _ in ready:
                i = index[sock]
                while True:
                    try:
                        frame = self._sync[i].recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        message = protocol.unpack(frame)
                    except ValueError as exc:
                        log.warning("bad answer from register=%s error=%r", self.addresses[i], exc)
                        continue
                    self._answered()
                    self.on_message(i, message)

    def _answered(self) -> None:
        self.last_answer = time.monotonic()
        if self._warned_at is not None:
            self._warned_at = None
            log.info("a register answers again registers=%s", ",".join(self.addresses))

    def _warn_if_silent(self, now: float) -> None:
        """Warn after SILENCE_WARN s without any register's answer, then every SILENCE_REPEAT s."""
        silent = now - self.last_answer
        if silent < SILENCE_WARN:
            return
        if self._warned_at is None or now - self._warned_at >= SILENCE_REPEAT:
            self._warned_at = now
            log.warning(
                "no register answers registers=%s silent_s=%.0f (is it running, with this "
                "cluster's key?)",
                ",".join(self.addresses),
                silent,
            )

    def bye(self, member_id: str) -> None:
        """Tell every register we are leaving (best effort: a dead register needs no goodbye)."""
        self._send_all([protocol.BYE, member_id])

    def close(self) -> None:
        for watcher in self._watchers:
            watcher.close()
        self._watchers.clear()
        for sock in self._socks:
            sock.close(linger=200)
        self._socks.clear()
        self._sync.clear()

    def _send_all(self, message: list[Any]) -> None:
        frame = protocol.pack(message)
        for sock in self._sync:
            # A full queue means the register is unreachable: the next beat will do.
            with contextlib.suppress(zmq.Again):
                sock.send(frame, zmq.NOBLOCK)


class RegisterRefuses(OperatorError):
    """A register refused our handshake (the message says why)."""


async def fetch_status(
    address: str, timeout: float = 3.0, keys: Keys | None = None
) -> dict[str, Any]:
    """Ask one register for its table (the ``status`` command and the tests use this).

    A register that refuses the handshake is reported with the reason at once,
    rather than as a timeout.
    """
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.client(sock)
    monitor = sock.get_monitor_socket(auth.HANDSHAKE_EVENTS)
    try:
        sock.connect(address)
        await sock.send(protocol.pack([protocol.STATUS]))
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(await poller.poll(left * 1000))
            if sock in ready:
                return protocol.unpack(await sock.recv())[1]
            if monitor in ready:
                why = auth.describe_client_failure(
                    parse_monitor_message(await monitor.recv_multipart()), keys is not None
                )
                if why is not None:
                    raise RegisterRefuses(f"register {address} refuses us: {why}")
        raise TimeoutError(f"no answer from register {address} within {timeout:g} s")
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
