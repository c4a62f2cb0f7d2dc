"""Parent side of the benchmark: load processes, the servers under test, /proc readings."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import loadproc

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# /proc readings


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_times() -> list[tuple[float, float]]:
    """Per CPU (busy, total) jiffies from /proc/stat; busy includes irq and softirq."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                total = sum(v[:8])
                out.append((total - idle, total))
    return out


def steal_jiffies() -> int:
    """Time the hypervisor gave this VM's CPUs to others (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def busy_fraction(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[float]:
    return [
        round((b1 - a1) / (t2 - t1), 3) if t2 > t1 else 0.0
        for (a1, t1), (b1, t2) in zip(a, b, strict=True)
    ]


def all_cpu() -> dict[int, float]:
    """CPU seconds of every process on the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            out[int(name)] = cpu_seconds(int(name))
    return out


class CpuMeter:
    """CPU seconds of groups of processes, and per-core busy time, over an interval.

    ``others_cpu_s`` is what every other process on the machine used meanwhile
    (a test suite running beside the benchmark shows up there): figures taken
    while it is high are disturbed. ``steal_pct`` is CPU the hypervisor gave to
    other machines meanwhile (percent of one core).
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.ours = {p for pids in groups.values() for p in pids} | {os.getpid()}
        self.start()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {k: sum(cpu_seconds(p) for p in pids) for k, pids in self.groups.items()}
        self.s0 = cpu_times()
        self.steal0 = steal_jiffies()
        self.a0 = all_cpu()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        out: dict[str, Any] = {"wall_s": round(wall, 3)}
        for k, pids in self.groups.items():
            used = sum(cpu_seconds(p) for p in pids) - self.c0[k]
            out[f"{k}_cpu_s"] = round(used, 3)
            out[f"{k}_cpu_pct"] = round(100 * used / wall, 1) if wall else 0.0
        others = sum(
            max(0.0, v - self.a0.get(p, 0.0)) for p, v in all_cpu().items() if p not in self.ours
        )
        out["others_cpu_s"] = round(others, 3)
        out["others_cpu_pct"] = round(100 * others / wall, 1) if wall else 0.0
        out["core_busy"] = busy_fraction(self.s0, cpu_times())
        # A VM's CPUs can be taken by the host: a run with steal is slowed from outside.
        steal = (steal_jiffies() - self.steal0) / os.sysconf("SC_CLK_TCK")
        out["steal_pct"] = round(100 * steal / wall, 1) if wall else 0.0
        # One core each when pinned: whichever side is near 100 % of its core bounds the run.
        sides = [k for k in ("server", "client") if out.get(f"{k}_cpu_pct", 0) >= 90]
        out["saturated"] = sides or None
        return out


def percentiles(values: list[int] | Any, scale: float = 1e-6) -> dict[str, float | None]:
    """p50/p99/max of nanosecond values, in milliseconds."""
    if not len(values):
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "n": 0}
    s = sorted(values)
    n = len(s)
    return {
        "p50_ms": round(s[n // 2] * scale, 3),
        "p99_ms": round(s[min(n - 1, int(n * 0.99))] * scale, 3),
        "max_ms": round(s[-1] * scale, 3),
        "n": n,
    }


# Load processes


class LoadError(RuntimeError):
    pass


class LoadPool:
    """``n`` load processes (spawned), each a ``loadproc.LoadProcess`` behind a pipe."""

    def __init__(self, n: int, cpus: list[int] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self._req = 0
        self._inbox: list[dict[int, tuple[bool, Any]]] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=loadproc.main, args=(child, i, cpus), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
            self._inbox.append({})
        self.pids = self.call("ping", timeout=30)

    def __len__(self) -> int:
        return len(self.pipes)

    def start(self, name: str, kwargs: list[dict[str, Any]] | dict[str, Any] | None = None) -> int:
        """Send a command to every process (a list gives each its own kwargs); a ticket."""
        self._req += 1
        for i, pipe in enumerate(self.pipes):
            kw = kwargs[i] if isinstance(kwargs, list) else (kwargs or {})
            pipe.send((self._req, name, kw))
        return self._req

    def wait(self, req: int, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        results: list[Any] = [None] * len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            inbox = self._inbox[i]
            while req not in inbox:
                left = deadline - time.monotonic()
                if left <= 0 or not pipe.poll(left):
                    raise LoadError(f"load process {i}: no answer in {timeout} s (req {req})")
                try:
                    r, ok, value = pipe.recv()
                except EOFError:
                    raise LoadError(f"load process {i} died") from None
                inbox[r] = (ok, value)
            ok, value = inbox.pop(req)
            if not ok:
                raise LoadError(f"load process {i}: {value}")
            results[i] = value
        return results

    def call(
        self, name: str, kwargs: list[dict[str, Any]] | dict[str, Any] | None = None, *, timeout
    ) -> list[Any]:
        return self.wait(self.start(name, kwargs), timeout)

    def call_one(self, i: int, name: str, kwargs: dict[str, Any], *, timeout: float) -> Any:
        self._req += 1
        req = self._req
        self.pipes[i].send((req, name, kwargs))
        deadline = time.monotonic() + timeout
        inbox = self._inbox[i]
        while req not in inbox:
            left = deadline - time.monotonic()
            if left <= 0 or not self.pipes[i].poll(left):
                raise LoadError(f"load process {i}: no answer to {name} in {timeout} s")
            r, ok, value = self.pipes[i].recv()
            inbox[r] = (ok, value)
        ok, value = inbox.pop(req)
        if not ok:
            raise LoadError(f"load process {i}: {value}")
        return value

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send((0, "exit", {}))
        for proc in self.procs:
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(3)
        for pipe in self.pipes:
            pipe.close()


# Servers under test


@dataclass
class Servers:
    """The cluster under test: started here (``own``) or found through a register."""

    urls: list[tuple[str, int]]
    gateway_pids: list[int]
    worker_pids: list[int]
    register: str
    register_pids: list[int] = field(default_factory=list)
    """the registers we started (they sequence history groups: server CPU too)"""
    cluster: Any = None
    log_dir: Path | None = None
    pinned: list[int] = field(default_factory=list)
    env: dict[str, str] | None = None
    """what ``python -m register status`` needs to reach this cluster (its key)"""

    @property
    def pids(self) -> list[int]:
        return self.gateway_pids + self.worker_pids + self.register_pids

    def rss(self) -> dict[str, int]:
        return {
            "gateways_rss_kib": sum(rss_kib(p) for p in self.gateway_pids),
            "workers_rss_kib": sum(rss_kib(p) for p in self.worker_pids),
        }

    def gateway_log(self) -> str:
        if self.log_dir is None:
            return ""
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("gateway*.log"))
        )

    def slow_closed(self) -> list[dict[str, Any]]:
        """'client too slow' lines of the gateways' logs: wall time and client id."""
        out = []
        pattern = re.compile(
            r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*client too slow.*client=(\d+)"
            r"(?:.*buffered=(\d+))?",
            re.M,
        )
        for m in pattern.finditer(self.gateway_log()):
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            out.append(
                {
                    "time": t,
                    "client": int(m.group(3)),
                    "buffered": int(m.group(4)) if m.group(4) else None,
                }
            )
        return out

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def fetch_status(register: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "register", "status", "--register", register, "--json"],
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
        env=None if env is None else {**os.environ, **env},
    )
    return json.loads(out.stdout)


def start_servers(
    *,
    gateways: int,
    workers: int,
    gateway_args: list[str],
    pin: list[int] | None,
    log_root: Path,
    url: str | None,
    register: str | None,
) -> Servers:
    """Start a cluster on free loopback ports, or describe the one at ``url``/``register``."""
    if url or register:
        urls = []
        if url:
            parts = urlsplit(url)
            urls = [(parts.hostname or "127.0.0.1", parts.port or 80)]
        status = fetch_status(register) if register else {"gateways": [], "workers": []}
        servers = Servers(
            urls=urls,
            gateway_pids=[g["pid"] for g in status["gateways"]],
            worker_pids=[w["pid"] for w in status["workers"]],
            register=register or "",
        )
        return servers

    from tests.cluster import Cluster

    log_root.mkdir(parents=True, exist_ok=True)
    log_dir = Path(
        os.path.join(log_root, f"cluster-{time.strftime('%H%M%S')}-{os.urandom(2).hex()}")
    )
    log_dir.mkdir()
    cluster = Cluster(
        gateways=gateways, workers=workers, gateway_args=gateway_args, log_dir=str(log_dir)
    )
    try:
        cluster.start(timeout=60)
        status = cluster.wait_ready(timeout=60)
    except BaseException:
        cluster.stop()
        raise
    gw_pids = [p.pid for p in cluster.gateways if p is not None]
    wk_pids = [p.pid for p in cluster.workers if p is not None]
    listed = {g["pid"] for g in status["gateways"]} | {w["pid"] for w in status["workers"]}
    assert set(gw_pids + wk_pids) <= listed, (gw_pids, wk_pids, status)
    servers = Servers(
        urls=[("127.0.0.1", port) for port in cluster.ws_ports],
        gateway_pids=gw_pids,
        worker_pids=wk_pids,
        register=cluster.register_address,
        register_pids=[p.pid for p in cluster.registers if p is not None],
        cluster=cluster,
        log_dir=log_dir,
        env=cluster.env,
    )
    if pin:
        for pid in servers.pids:
            pin_process_tree(pid, pin)
        servers.pinned = pin
    return servers


def pin_process_tree(pid: int, cpus: list[int]) -> None:
    """Pin every thread of a process (ZeroMQ's I/O threads included)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
    except OSError:
        pass


def sources(count: int) -> list[str]:
    """Loopback source addresses 127.0.0.2 .. for spreading client ports."""
    return [f"127.0.{i // 250}.{2 + i % 250}" for i in range(count)]
