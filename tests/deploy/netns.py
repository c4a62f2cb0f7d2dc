"""Hosts made of Linux network namespaces on one bridge, touching nothing outside them.

A "switch" namespace holds a bridge; each host is a namespace with one end of a veth
pair (both ends are created inside namespaces) and an address 10.77.0.N/24. While the
network exists, a blackhole route for 10.77.0.0/24 in the root namespace makes sure no
packet for those addresses ever leaves the machine. Names carry a prefix and the owning
test process id: namespaces of a dead owner are stale and removed at the next start.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "chatdep"
SUBNET = "10.77.0.0/24"
STALE = re.compile(rf"^{PREFIX}(\d+)-")


class Unavailable(Exception):
    """Network namespaces cannot be made here (no iproute2, no privilege)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and run.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")
    return run


def namespaces() -> list[str]:
    run = ip("netns", "list", check=False)
    return [line.split()[0] for line in run.stdout.splitlines() if line.strip()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_runs() -> set[int]:
    """Owner pids of our namespaces whose owner still runs."""
    owners = {int(m.group(1)) for ns in namespaces() if (m := STALE.match(ns))}
    return {pid for pid in owners if alive(pid)}


def remove_stale() -> list[str]:
    """Delete namespaces left by a test run that died; stop the supervisord it left there."""
    removed = []
    for ns in namespaces():
        m = STALE.match(ns)
        if not m or alive(int(m.group(1))):
            continue
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:  # our own leftovers: supervisord stops its programs cleanly
            with contextlib.suppress(OSError):
                if b"supervisord" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        ip("netns", "del", ns, check=False)
        removed.append(ns)
    return removed


class Network:
    """``hosts`` namespaces on one bridge: host i has address 10.77.0.(i+1)."""

    def __init__(self, hosts: list[str]) -> None:
        self.run_id = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.run_id}-sw"
        self.names = {h: f"{self.run_id}-{h}" for h in hosts}
        self.addresses = {h: f"10.77.0.{i + 1}" for i, h in enumerate(hosts)}
        self.made: list[str] = []
        self.blackhole = False

    def __enter__(self) -> Network:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        try:
            remove_stale()
            self._add(self.switch)
        except (RuntimeError, OSError) as exc:  # no iproute2, no privilege
            raise Unavailable(str(exc)) from exc
        existing = ip("route", "show", SUBNET).stdout.strip()
        if existing and not existing.startswith("blackhole"):
            raise Unavailable(f"the root namespace already routes {SUBNET}: {existing}")
        if not existing:
            ip("route", "add", "blackhole", SUBNET)
        self.blackhole = True
        sw = ["-n", self.switch]
        ip(*sw, "link", "add", "br0", "type", "bridge")
        ip(*sw, "link", "set", "br0", "up")
        for i, (host, ns) in enumerate(self.names.items()):
            self._add(ns)
            port = f"p{i}"
            ip(*sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip(*sw, "link", "set", port, "master", "br0")
            ip(*sw, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def _add(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.made.append(ns)

    def down(self) -> None:
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)
        self.made.clear()
        # The route is shared with other live runs of this test: the last one removes it.
        if self.blackhole and not live_runs() - {os.getpid()}:
            ip("route", "del", "blackhole", SUBNET, check=False)
        self.blackhole = False

    def exec(self, host: str) -> list[str]:
        """The command prefix that runs a command on ``host``."""
        return ["ip", "netns", "exec", self.names[host]]
