"""The scenarios. Each returns one result dict (one JSON line) and cleans up after itself.

Every scenario is bounded in count and in time: sends stop at a message-id
limit or at ``duration``, and every wait on the load processes has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import floor as floor_mod
from bench.harness import (
    CpuMeter,
    LoadPool,
    Servers,
    fetch_status,
    percentiles,
    rss_kib,
    sources,
    start_servers,
)
from bench.loadproc import content_for

GATEWAYWORKER_FLOOD = 98_000
"""Deliveries/s GatewayWorker reaches flooded, 1 gateway + 1 worker (figure quoted by issue 5)."""
GATEWAYWORKER_LOGIN_STORM_S = 7.5
MAX_SOCKETS_PER_PROCESS = 18_000


@dataclass
class Settings:
    connections: int = 30_000
    gateways: int | None = None
    workers: int = 1
    duration: float = 10.0
    room_size: int = 1000
    rate: float = 50.0
    private_clients: int = 2000
    private_rate: float = 2000.0
    private_room: int = 100
    storm_clients: int = 1000
    content_size: int = 60
    slow_content_size: int = 4000
    slow_rate: float = 50.0
    slow_phase_max: float = 45.0
    window: int = 32
    max_says: int = 50_000
    load_procs: int = 4
    handshake_concurrency: int = 64
    floor_connections: int = 1000
    floor_sends: int = 300_000
    pin: str = "both"
    """both: servers on CPU 0, load on CPU 1; servers: servers on CPU 0 only; none"""
    url: str | None = None
    register: str | None = None
    out_dir: Path = Path("bench/output")
    profile: bool = False
    gateway_args: list[str] = field(default_factory=list)
    quick: bool = False
    floor_us: float | None = None
    frame_bytes: int | None = None
    room_fixed_p99: float | None = None
    log: Callable[[str], None] = print

    @property
    def server_cpus(self) -> list[int] | None:
        two = (os.cpu_count() or 1) >= 2
        return [0] if self.pin in ("both", "servers") and two else None

    @property
    def load_cpus(self) -> list[int] | None:
        return [1] if self.pin == "both" and self.server_cpus else None


# Helpers


def say_frame_bytes(content_size: int) -> bytes:
    """The broadcast frame the gateway writes for one of our says (same size and shape)."""
    message = {
        "type": "say",
        "from_uid": 7_300_000_000_000_001,
        "to_uid": "all",
        "content": content_for(123, content_size),
        "time": "2026-11-21 23:59:59",
    }
    payload = json.dumps(message, separators=(",", ":")).encode()
    from bench.wsclient import server_frame

    return server_frame(payload)


def target(name: str, value: float | None, goal: float, *, at_most: bool, unit: str = "") -> dict:
    if value is None:
        return {"name": name, "value": None, "target": goal, "met": False, "unit": unit}
    met = value <= goal if at_most else value >= goal
    return {
        "name": name,
        "value": value,
        "target": ("<= " if at_most else ">= ") + f"{goal:g}",
        "met": met,
        "unit": unit,
        "ratio_to_target": round(value / goal, 3) if goal else None,
    }


class Run:
    """Servers + load processes for one scenario; stops both on exit."""

    def __init__(self, s: Settings, *, gateways: int, procs: int, gateway_args: list[str] = ()):
        self.s = s
        self.servers: Servers | None = None
        self.pool: LoadPool | None = None
        self.gateways = gateways
        self.procs = procs
        self.gateway_args = [*s.gateway_args, *gateway_args]

    def __enter__(self) -> Run:
        try:
            self.servers = start_servers(
                gateways=self.gateways,
                workers=self.s.workers,
                gateway_args=self.gateway_args,
                pin=self.s.server_cpus,
                log_root=self.s.out_dir,
                url=self.s.url,
                register=self.s.register,
            )
            self.pool = LoadPool(self.procs, self.s.load_cpus)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            with contextlib.suppress(Exception):
                self.pool.call("close_all", timeout=30)
            self.pool.close()
        if self.servers is not None:
            self.servers.stop()

    def meter(self) -> CpuMeter:
        return CpuMeter(
            {
                "server": self.servers.pids,
                "gateways": self.servers.gateway_pids,
                "workers": self.servers.worker_pids,
                "register": self.servers.register_pids,
                "client": self.pool.pids,
            }
        )

    def connect(
        self,
        total: int,
        *,
        rcvbuf: dict[int, dict[int, int]] | None = None,
        split: list[int] | None = None,
    ) -> dict:
        """Open ``total`` connections split over the load processes and the gateways."""
        urls = self.servers.urls
        n = len(self.pool)
        if split is None:
            split = [total // n + (1 if i < total % n else 0) for i in range(n)]
        srcs = sources(max(4, math.ceil(total / 5000)))
        kwargs = []
        for i in range(n):
            # rotate the gateways so every process spreads evenly over them
            targets = urls[i % len(urls) :] + urls[: i % len(urls)]
            kwargs.append(
                {
                    "targets": targets,
                    "count": split[i],
                    "sources": srcs[i::n] or srcs,
                    "concurrency": 100,
                    "rcvbuf": (rcvbuf or {}).get(i),
                }
            )
        t0 = time.monotonic()
        res = self.pool.call("connect", kwargs, timeout=120 + total / 500)
        seconds = time.monotonic() - t0
        opened = sum(r["opened"] for r in res)
        failed = sum(r["failed"] for r in res)
        if failed:
            raise RuntimeError(
                f"{failed} of {total} connections failed: {[r['failures'] for r in res]}"
            )
        return {"opened": opened, "seconds": round(seconds, 3), "split": split}

    def login_room(self, room: str, *, rooms_of: int | None = None) -> list[list[int]]:
        """Log every connection in; with ``rooms_of``, in rooms of that many. uids per process."""
        n = len(self.pool)
        sizes = self.pool.call("alive", timeout=30)
        kwargs = []
        k = 0
        for i in range(n):
            count = sizes[i]["open"]
            names = [f"p{i}c{j}" for j in range(count)]
            rooms = []
            for _ in range(count):
                rooms.append(f"{room}-{k // rooms_of}" if rooms_of else room)
                k += 1
            # Few logins in flight: setting up a room is not what is measured, and a
            # deep queue of logins makes the gateway answer joins late (see README).
            kwargs.append({"names": names, "rooms": rooms, "concurrency": 10})
        return self.pool.call("login", kwargs, timeout=120)

    def drain(self, expected: int, timeout: float) -> int:
        """Wait until the load processes received ``expected`` say frames in all."""
        deadline = time.monotonic() + timeout
        delivered = 0
        while time.monotonic() < deadline:
            delivered = sum(r["delivered"] for r in self.pool.call("progress", timeout=30))
            if delivered >= expected:
                break
            time.sleep(0.05)
        return delivered

    def latencies(self) -> array:
        lat = array("q")
        for data in self.pool.call("latencies", timeout=60):
            lat.frombytes(data)
        return lat

    def spread(self, ranges: list[tuple[int, int]]) -> dict[str, Any]:
        """Latency of each say's first and last delivery (the fan-out span), p50/p99."""
        firsts: array | None = None
        lasts: array | None = None
        for f_b, l_b in self.pool.call("spread", timeout=60):
            if not f_b:
                continue
            f, la = array("q"), array("q")
            f.frombytes(f_b)
            la.frombytes(l_b)
            if firsts is None:
                firsts, lasts = f, la
                continue
            for i, v in enumerate(f):
                if v and (firsts[i] == 0 or v < firsts[i]):
                    firsts[i] = v
                if la[i] > lasts[i]:
                    lasts[i] = la[i]
        if firsts is None:
            return {}
        first = [firsts[i] for lo, hi in ranges for i in range(lo, hi) if firsts[i]]
        last = [lasts[i] for lo, hi in ranges for i in range(lo, hi) if lasts[i]]
        pf, pl = percentiles(first), percentiles(last)
        return {
            "first_delivery_p50_ms": pf["p50_ms"],
            "first_delivery_p99_ms": pf["p99_ms"],
            "last_delivery_p50_ms": pl["p50_ms"],
            "last_delivery_p99_ms": pl["p99_ms"],
        }

    def timeline(self, t0_ns: int, worst: int = 5) -> list[list[float]]:
        """The ``worst`` 100 ms windows of send time: [seconds after t0, worst latency ms]."""
        merged: dict[int, int] = {}
        for tl in self.pool.call("timeline", timeout=30):
            for k, v in tl.items():
                if merged.get(k, 0) < v:
                    merged[k] = v
        top = sorted(merged.items(), key=lambda kv: -kv[1])[:worst]
        return [[round(k / 10 - t0_ns / 1e9, 1), round(v / 1e6, 1)] for k, v in top]

    def errors(self) -> dict[str, Any]:
        res = self.pool.call("errors", timeout=30)
        return {
            "errors": sum(r["errors"] for r in res),
            "samples": [x for r in res for x in r["samples"]][:3],
        }


def per_proc_ids(total: int, procs: int) -> tuple[int, list[tuple[int, int]]]:
    """Message-id ranges: each process gets [lo, hi) of size ceil(total / procs)."""
    size = max(1, math.ceil(total / procs))
    return size * procs, [(i * size, (i + 1) * size) for i in range(procs)]


def with_floor(s: Settings, us: float | None) -> float | None:
    if us is None or not s.floor_us:
        return None
    return round(us / s.floor_us, 3)


# Scenarios


def floor(s: Settings) -> dict[str, Any]:
    frame = say_frame_bytes(s.content_size)
    r = floor_mod.measure(
        frame,
        connections=s.floor_connections,
        sends=s.floor_sends,
        sender_cpus=s.server_cpus,
        reader_cpus=s.load_cpus,
    )
    s.floor_us = r["floor_us"]
    s.frame_bytes = r["frame_bytes"]
    ok = r["bytes_read"] == r["bytes_expected"]
    return {
        "ok": ok,
        "config": {
            "connections": s.floor_connections,
            "frame_bytes": len(frame),
            "sender_cpu": s.server_cpus,
            "reader_cpu": s.load_cpus,
        },
        "metrics": r,
        "summary": f"{r['floor_us']} us CPU per send() of {len(frame)} B "
        f"(user {r['utime_us']}, sys {r['stime_us']})",
    }


def idle(s: Settings) -> dict[str, Any]:
    n = s.connections
    gateways = s.gateways or max(2, math.ceil(n / 19_000))
    procs = max(2, math.ceil(n / MAX_SOCKETS_PER_PROCESS))
    if s.url and gateways > 1:
        gateways = 1
    with Run(s, gateways=gateways, procs=procs) as run:
        time.sleep(1.0)
        rss0 = {p: rss_kib(p) for p in run.servers.gateway_pids}
        client_rss0 = sum(rss_kib(p) for p in run.pool.pids)
        meter = run.meter()
        conn = run.connect(n)
        connect_cpu = meter.stop()
        hold = min(s.duration, 5.0)
        time.sleep(hold)
        rss1 = {p: rss_kib(p) for p in run.servers.gateway_pids}
        client_rss1 = sum(rss_kib(p) for p in run.pool.pids)
        alive = run.pool.call("alive", timeout=30)
        still_open = sum(a["open"] for a in alive)
        status_conns = None
        if run.servers.register:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    st = fetch_status(run.servers.register, run.servers.env)
                    status_conns = sum(g["connections"] for g in st["gateways"])
                except (subprocess.SubprocessError, ValueError, KeyError):
                    status_conns = None
                if status_conns == n:
                    break
                time.sleep(0.5)
        delta = sum(rss1.values()) - sum(rss0.values())
        per_conn = delta / n if n else None
        per_gateway = [
            {
                "pid": p,
                "rss_empty_kib": rss0[p],
                "rss_kib": rss1[p],
                "kib_per_conn": round((rss1[p] - rss0[p]) / max(1, n / gateways), 3),
            }
            for p in run.servers.gateway_pids
        ]
        ok = still_open == n and (status_conns in (None, n))
        return {
            "ok": ok,
            "config": {
                "connections": n,
                "gateways": gateways,
                "load_processes": procs,
                "source_addresses": len(sources(max(4, math.ceil(n / 5000)))),
            },
            "metrics": {
                "kib_per_conn": round(per_conn, 3) if per_conn is not None else None,
                "gateways_rss_empty_kib": sum(rss0.values()),
                "gateways_rss_kib": sum(rss1.values()),
                "per_gateway": per_gateway,
                "client_kib_per_conn": round((client_rss1 - client_rss0) / n, 3),
                "connect_seconds": conn["seconds"],
                "connects_per_s": round(n / conn["seconds"], 1),
                "connect_cpu": connect_cpu,
                "server_cpu_us_per_connect": round(connect_cpu["server_cpu_s"] / n * 1e6, 1),
                "open_after_hold": still_open,
                "hold_s": hold,
                "register_status_connections": status_conns,
            },
            "targets": [
                target("kib_per_idle_conn", round(per_conn, 3), 8.0, at_most=True, unit="KiB"),
                target("connections_held", still_open, n, at_most=False),
            ],
            "summary": f"{n} idle conns on {gateways} gateways: {per_conn:.2f} KiB/conn",
        }


def _room_setup(run: Run, room: str, size: int, rcvbuf=None, split=None) -> dict[str, Any]:
    c = run.connect(size, rcvbuf=rcvbuf, split=split)
    t0 = time.monotonic()
    run.login_room(room)
    return {"connect_s": c["seconds"], "login_s": round(time.monotonic() - t0, 3)}


def _verify_room(run: Run, ranges: list[tuple[int, int]], skip=None) -> dict[str, Any]:
    res = run.pool.call(
        "verify_room",
        [{"ranges": ranges, "skip": (skip or {}).get(i)} for i in range(len(run.pool))],
        timeout=60,
    )
    return {
        "lost": sum(r["lost"] for r in res),
        "duplicated": sum(r["duplicated"] for r in res),
        "members_checked": sum(r["members"] for r in res),
        "examples": [e for r in res for e in r["examples"]][:3],
    }


def room_fixed(s: Settings, *, name: str = "room_fixed") -> dict[str, Any]:
    size = s.room_size
    procs = min(s.load_procs, size)
    gateways = s.gateways or 1
    room = f"{name}-{os.urandom(3).hex()}"
    with Run(s, gateways=gateways, procs=procs) as run:
        setup = _room_setup(run, room, size)
        per_rate = s.rate / procs
        cap = math.ceil(per_rate * s.duration * 1.2) + 10
        slots, ranges = per_proc_ids(cap * procs, procs)
        run.pool.call("prepare_room", {"members": True, "slots": slots}, timeout=30)
        senders_n = [len(range(i, size, procs)) for i in range(procs)]
        t0_ns = time.monotonic_ns()
        start_at = time.monotonic() + 0.1
        spy = Profiler(s, run.servers, s.duration, name) if s.profile else None
        meter = run.meter()
        res = run.pool.call(
            "room_send",
            [
                {
                    "mid_lo": ranges[i][0],
                    "mid_hi": ranges[i][1],
                    "rate": per_rate,
                    "duration": s.duration,
                    "content_size": s.content_size,
                    "senders": list(range(senders_n[i])),
                    "start_at": start_at,
                    "phase": i / s.rate,
                }
                for i in range(procs)
            ],
            timeout=s.duration + 30,
        )
        sent = sum(r["sent"] for r in res)
        expected = sent * size
        delivered = run.drain(expected, timeout=15)
        m = meter.stop()
        profile = spy.finish() if spy is not None else None
        sent_ranges = [(r["mid_lo"], r["mid_end"]) for r in res]
        check = _verify_room(run, sent_ranges)
        lat = percentiles(run.latencies())
        worst = run.timeline(t0_ns)
        spread = run.spread(sent_ranges)
        errs = run.errors()
        rss = run.servers.rss()
    us = m["server_cpu_s"] / delivered * 1e6 if delivered else None
    ok = check["lost"] == 0 and check["duplicated"] == 0 and delivered == expected
    if name == "room_fixed":
        s.room_fixed_p99 = lat["p99_ms"]
    x = with_floor(s, us)
    return {
        "ok": ok,
        "config": {
            "room_size": size,
            "says_per_s": s.rate,
            "duration_s": s.duration,
            "gateways": gateways,
            "workers": s.workers,
            "load_processes": procs,
            "content_chars": s.content_size,
        },
        "metrics": {
            **setup,
            "says": sent,
            "deliveries": delivered,
            "expected_deliveries": expected,
            "deliveries_per_s": round(delivered / m["wall_s"], 1),
            **{f"latency_{k}": v for k, v in lat.items()},
            **spread,
            "worst_windows_s_ms": worst,
            "server_us_per_delivery": round(us, 3) if us else None,
            "x_floor": x,
            "floor_us": s.floor_us,
            "gateway_ms_per_say": round(m["gateways_cpu_s"] / sent * 1e3, 3) if sent else None,
            "client_us_per_delivery": round(m["client_cpu_s"] / delivered * 1e6, 3)
            if delivered
            else None,
            "cpu": m,
            **rss,
            **check,
            **errs,
        },
        "targets": [
            target("cpu_per_delivery_x_floor", x, 1.2, at_most=True),
            target("latency_p99_ms", lat["p99_ms"], 5.0, at_most=True, unit="ms"),
        ],
        **({"profile": profile} if profile else {}),
        "summary": f"{size} in room, {s.rate:g} says/s: p50 {lat['p50_ms']} p99 {lat['p99_ms']} "
        f"max {lat['max_ms']} ms; {us and round(us, 2)} us/delivery ({x} x floor)",
    }


def room_max(s: Settings) -> dict[str, Any]:
    size = s.room_size
    procs = min(s.load_procs, size)
    gateways = s.gateways or 1
    room = f"room_max-{os.urandom(3).hex()}"
    profile: dict[str, Any] | None = None
    with Run(s, gateways=gateways, procs=procs) as run:
        setup = _room_setup(run, room, size)
        slots, ranges = per_proc_ids(s.max_says, procs)
        run.pool.call(
            "prepare_room", {"members": True, "slots": slots, "record_lat": False}, timeout=30
        )
        window = max(1, s.window // procs)
        senders_n = [len(range(i, size, procs)) for i in range(procs)]
        spy = Profiler(s, run.servers, s.duration, "room_max") if s.profile else None
        meter = run.meter()
        res = run.pool.call(
            "room_flood",
            [
                {
                    "mid_lo": ranges[i][0],
                    "mid_hi": ranges[i][1],
                    "window": window,
                    "duration": s.duration,
                    "content_size": s.content_size,
                    "senders": list(range(senders_n[i])),
                }
                for i in range(procs)
            ],
            timeout=s.duration + 60,
        )
        sent = sum(r["sent"] for r in res)
        expected = sent * size
        delivered = run.drain(expected, timeout=20)
        m = meter.stop()
        if spy is not None:
            profile = spy.finish()
        check = _verify_room(run, [(r["mid_lo"], r["mid_end"]) for r in res])
        errs = run.errors()
        rss = run.servers.rss()
    us = m["server_cpu_s"] / delivered * 1e6 if delivered else None
    rate = delivered / m["wall_s"]
    x = with_floor(s, us)
    ok = check["lost"] == 0 and check["duplicated"] == 0 and delivered == expected
    result = {
        "ok": ok,
        "config": {
            "room_size": size,
            "window": window * procs,
            "duration_s": s.duration,
            "max_says": s.max_says,
            "gateways": gateways,
            "workers": s.workers,
            "load_processes": procs,
            "content_chars": s.content_size,
        },
        "metrics": {
            **setup,
            "says": sent,
            "deliveries": delivered,
            "expected_deliveries": expected,
            "deliveries_per_s": round(rate, 1),
            "says_per_s": round(sent / m["wall_s"], 1),
            "server_us_per_delivery": round(us, 3) if us else None,
            "server_capacity_per_s": round(1e6 / us) if us else None,
            "x_floor": x,
            "floor_us": s.floor_us,
            "x_gatewayworker": round(rate / GATEWAYWORKER_FLOOD, 3),
            "gateway_ms_per_say": round(m["gateways_cpu_s"] / sent * 1e3, 3) if sent else None,
            "client_us_per_delivery": round(m["client_cpu_s"] / delivered * 1e6, 3)
            if delivered
            else None,
            "cpu": m,
            **rss,
            **check,
            **errs,
        },
        "targets": [
            target("cpu_per_delivery_x_floor", x, 0.5, at_most=True),
            target("deliveries_per_s", round(rate), 3 * GATEWAYWORKER_FLOOD, at_most=False),
        ],
        "summary": f"{size} in room, flooded: {rate:,.0f} deliveries/s "
        f"({rate / GATEWAYWORKER_FLOOD:.2f} x GatewayWorker), {us and round(us, 2)} us/delivery "
        f"({x} x floor)",
    }
    if profile is not None:
        result["profile"] = profile
    return result


def private(s: Settings) -> dict[str, Any]:
    n = s.private_clients
    procs = min(s.load_procs, n)
    gateways = s.gateways or 1
    room = f"private-{os.urandom(3).hex()}"
    with Run(s, gateways=gateways, procs=procs) as run:
        c = run.connect(n)
        t0 = time.monotonic()
        uids = run.login_room(room, rooms_of=s.private_room)
        login_s = time.monotonic() - t0
        # global connection number k -> room k // private_room (see login_room)
        flat = [(i, j, uid) for i, us in enumerate(uids) for j, uid in enumerate(us)]
        by_room: dict[int, list[int]] = {}
        for k, (_i, _j, uid) in enumerate(flat):
            by_room.setdefault(k // s.private_room, []).append(uid)
        peers: list[list[list[int]]] = [[] for _ in range(procs)]
        for k, (i, _j, uid) in enumerate(flat):
            peers[i].append([u for u in by_room[k // s.private_room] if u != uid])
        per_rate = s.private_rate / procs
        cap = math.ceil(per_rate * s.duration * 1.2) + 10
        slots, ranges = per_proc_ids(cap * procs, procs)
        spy = Profiler(s, run.servers, s.duration, "private") if s.profile else None
        start_at = time.monotonic() + 0.1
        meter = run.meter()
        res = run.pool.call(
            "private_send",
            [
                {
                    "mid_lo": ranges[i][0],
                    "mid_hi": ranges[i][1],
                    "rate": per_rate,
                    "duration": s.duration,
                    "content_size": s.content_size,
                    "peers": peers[i],
                    "slots": slots,
                    "start_at": start_at,
                    "phase": i / s.private_rate,
                }
                for i in range(procs)
            ],
            timeout=s.duration + 30,
        )
        sent = sum(r["sent"] for r in res)
        delivered = run.drain(2 * sent, timeout=15)
        m = meter.stop()
        profile = spy.finish() if spy is not None else None
        counts = run.pool.call("private_counts", timeout=60)
        to_target = bytearray(slots)
        to_sender = bytearray(slots)
        misrouted = 0
        for r in counts:
            misrouted += r["misrouted"]
            for dst, src in ((to_target, r["to_target"]), (to_sender, r["to_sender"])):
                for idx, v in enumerate(src):
                    if v:
                        dst[idx] = min(255, dst[idx] + v)
        lost = dup = 0
        for r in res:
            lo, hi = r["mid_lo"], r["mid_end"]
            for arr_ in (to_target, to_sender):
                seg = arr_[lo:hi]
                z, one = seg.count(0), seg.count(1)
                lost += z
                dup += len(seg) - z - one
        lat = percentiles(run.latencies())
        errs = run.errors()
        rss = run.servers.rss()
    us = m["server_cpu_s"] / sent * 1e6 if sent else None
    ok = lost == 0 and dup == 0 and misrouted == 0 and errs["errors"] == 0
    return {
        "ok": ok,
        "config": {
            "clients": n,
            "room_size": s.private_room,
            "messages_per_s": s.private_rate,
            "duration_s": s.duration,
            "gateways": gateways,
            "workers": s.workers,
            "load_processes": procs,
        },
        "metrics": {
            "connect_s": c["seconds"],
            "login_s": round(login_s, 3),
            "messages": sent,
            "deliveries": delivered,
            "messages_per_s": round(sent / m["wall_s"], 1),
            **{f"latency_{k}": v for k, v in lat.items()},
            "server_us_per_message": round(us, 3) if us else None,
            "x_floor": with_floor(s, us),
            "floor_us": s.floor_us,
            "cpu": m,
            "lost": lost,
            "duplicated": dup,
            "misrouted": misrouted,
            **rss,
            **errs,
        },
        "targets": [target("latency_p99_ms", lat["p99_ms"], 5.0, at_most=True, unit="ms")],
        **({"profile": profile} if profile else {}),
        "summary": f"{n} clients, {s.private_rate:g} private msg/s: p50 {lat['p50_ms']} "
        f"p99 {lat['p99_ms']} ms; {us and round(us, 1)} us server CPU per message",
    }


def login_storm(s: Settings) -> dict[str, Any]:
    n = s.storm_clients
    procs = min(s.load_procs, n)
    gateways = s.gateways or 1
    room = f"storm-{os.urandom(3).hex()}"
    timeout = 30.0
    with Run(s, gateways=gateways, procs=procs) as run:
        c = run.connect(n)
        sizes = [a["open"] for a in run.pool.call("alive", timeout=30)]
        run.pool.call(
            "storm_prepare",
            [
                {"names": [f"p{i}c{j}" for j in range(sizes[i])], "expected": n}
                for i in range(procs)
            ],
            timeout=30,
        )
        spy = Profiler(s, run.servers, 10, "login_storm") if s.profile else None
        meter = run.meter()
        res = run.pool.call("storm_go", {"room": room, "timeout": timeout}, timeout=timeout + 30)
        m = meter.stop()
        profile = spy.finish() if spy is not None else None
        rss = run.servers.rss()
    t0 = min(r["t0"] for r in res)
    done = sum(r["done"] for r in res)
    t_last = max(r["t_last"] for r in res)
    complete_s = (t_last - t0) / 1e9 if done == n else None
    per_client = [t for r in res for t in r["t_list"]]
    pct = percentiles(per_client)
    errors = sum(r["errors"] for r in res)
    ok = done == n and errors == 0
    return {
        "ok": ok,
        "config": {
            "clients": n,
            "gateways": gateways,
            "workers": s.workers,
            "load_processes": procs,
            "timeout_s": timeout,
        },
        "metrics": {
            "connect_s": c["seconds"],
            "complete_s": round(complete_s, 3) if complete_s else None,
            "clients_complete": done,
            "client_complete_p50_ms": pct["p50_ms"],
            "client_complete_p99_ms": pct["p99_ms"],
            "smallest_rosters": sorted(x for r in res for x in r["rosters"])[:3],
            "login_deliveries": n * (n + 1) // 2,
            "x_gatewayworker": round(GATEWAYWORKER_LOGIN_STORM_S / complete_s, 3)
            if complete_s
            else None,
            "cpu": m,
            **rss,
            "errors": errors,
            "error_samples": [x for r in res for x in r["error_samples"]][:3],
        },
        "targets": [target("complete_s", complete_s and round(complete_s, 3), 2.0, at_most=True)],
        **({"profile": profile} if profile else {}),
        "summary": f"{n} logins at once: every roster complete after "
        f"{complete_s and round(complete_s, 2)} s ({done}/{n} complete)",
    }


def handshakes(s: Settings) -> dict[str, Any]:
    gateways = s.gateways or 1
    procs = s.load_procs
    with Run(s, gateways=gateways, procs=procs) as run:
        conc = max(1, s.handshake_concurrency // procs)
        urls = run.servers.urls
        srcs = sources(64)
        spy = Profiler(s, run.servers, s.duration, "handshakes") if s.profile else None
        meter = run.meter()
        res = run.pool.call(
            "handshakes",
            [
                {
                    "targets": urls[i % len(urls) :] + urls[: i % len(urls)],
                    "sources": srcs[i::procs],
                    "concurrency": conc,
                    "duration": s.duration,
                    "max_count": 200_000,
                }
                for i in range(procs)
            ],
            timeout=s.duration + 60,
        )
        m = meter.stop()
        profile = spy.finish() if spy is not None else None
        rss = run.servers.rss()
    ok_n = sum(r["ok"] for r in res)
    failed = sum(r["failed"] for r in res)
    codes: dict[str, int] = {}
    for r in res:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    rate = ok_n / m["wall_s"]
    per_gw = rate / gateways
    us = m["server_cpu_s"] / ok_n * 1e6 if ok_n else None
    gw_us = m["gateways_cpu_s"] / ok_n * 1e6 if ok_n else None
    return {
        "ok": failed == 0 and ok_n > 0,
        "config": {
            "gateways": gateways,
            "workers": s.workers,
            "load_processes": procs,
            "concurrent_loops": conc * procs,
            "duration_s": s.duration,
        },
        "metrics": {
            "handshakes": ok_n,
            "failed": failed,
            "failures": [f for r in res for f in r["failures"]][:3],
            "close_codes": codes,
            "handshakes_per_s": round(rate, 1),
            "per_gateway_per_s": round(per_gw, 1),
            "server_us_per_handshake": round(us, 1) if us else None,
            "gateway_us_per_handshake": round(gw_us, 1) if gw_us else None,
            "gateway_capacity_per_s": round(1e6 / gw_us, 1) if gw_us else None,
            "cpu": m,
            **rss,
        },
        "targets": [target("per_gateway_per_s", round(per_gw, 1), 5000, at_most=False)],
        **({"profile": profile} if profile else {}),
        "summary": f"{rate:,.0f} handshakes/s on {gateways} gateway(s) "
        f"({per_gw:,.0f} per gateway); gateway CPU {gw_us and round(gw_us)} us each",
    }


TCP_CLOSE_WAIT_S = 6.5
"""How long after the cut-off we watch for the gateway to drop the TCP connection."""


def watch_tcp_close(run: Run, proc: int, idx: int, seconds: float) -> dict[str, Any]:
    """Poll the slow connection's TCP state (not reading it) until it leaves ESTABLISHED."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        state = run.pool.call_one(proc, "tcp_state", {"idx": idx}, timeout=10)
        if state != 1:
            return {"dropped": True, "after_cut_s": round(time.monotonic() - t0, 2), "state": state}
        time.sleep(0.1)
    return {"dropped": False, "still_established_after_s": seconds}


def cut_ok(cut: dict[str, Any], resume: dict[str, Any] | None) -> bool:
    if resume and resume.get("close_code") == 1008:
        return True
    return bool(cut.get("cut_off") and cut.get("tcp", {}).get("dropped"))


def slow_consumer(s: Settings) -> dict[str, Any]:
    size = s.room_size
    readers = min(s.load_procs, size - 1)
    # The slow connection gets a load process of its own (the last one), so that
    # reading its backlog when it is cut off cannot delay anybody else's deliveries.
    procs = readers + 1
    slow_proc = procs - 1
    gateways = s.gateways or 1
    room = f"slow-{os.urandom(3).hex()}"
    slow_idx = 0  # the only connection of the last process
    phase = s.duration
    slow_phase_max = max(phase, s.slow_phase_max)
    split = [(size - 1) // readers + (1 if i < (size - 1) % readers else 0) for i in range(readers)]
    split.append(1)
    with Run(s, gateways=gateways, procs=procs) as run:
        setup = _room_setup(run, room, size, rcvbuf={slow_proc: {slow_idx: 4096}}, split=split)
        per_rate = s.slow_rate / readers
        cap = math.ceil(per_rate * (phase + slow_phase_max) * 1.2) + 10
        slots, ranges = per_proc_ids(cap * procs, procs)
        senders = [list(range(split[i])) for i in range(readers)] + [[]]

        def send(lo: list[int], duration: float) -> int:
            return run.pool.start(
                "room_send",
                [
                    {
                        "mid_lo": lo[i],
                        "mid_hi": ranges[i][1],
                        "rate": per_rate,
                        "duration": duration,
                        "content_size": s.slow_content_size,
                        "senders": senders[i],
                        "start_at": time.monotonic() + 0.1,
                        "phase": i / s.slow_rate,
                    }
                    for i in range(procs)
                ],
            )

        # Phase A: everyone reads
        run.pool.call("prepare_room", {"members": True, "slots": slots}, timeout=30)
        t_a_ns = time.monotonic_ns()
        meter = run.meter()
        res_a = run.pool.wait(send([r[0] for r in ranges], phase), timeout=phase + 30)
        sent_a = sum(r["sent"] for r in res_a)
        delivered_a = run.drain(sent_a * size, timeout=15)
        m_a = meter.stop()
        lat_a = percentiles(run.latencies())
        worst_a = run.timeline(t_a_ns)
        spread_a = run.spread([(r["mid_lo"], r["mid_end"]) for r in res_a])
        check_a = _verify_room(run, [(r["mid_lo"], r["mid_end"]) for r in res_a])

        # Phase B: connection 0 stops reading; the same traffic goes on until it is cut
        # off (and at least ``phase`` seconds), at most ``slow_phase_max`` seconds.
        slow_uid = run.pool.call_one(slow_proc, "slow", {"idx": slow_idx}, timeout=10)
        base_delivered = sum(r["delivered"] for r in run.pool.call("progress", timeout=10))
        known = {e["client"] for e in run.servers.slow_closed()}
        t_slow_wall = time.time()
        t_slow = time.monotonic()
        t_slow_ns = time.monotonic_ns()
        meter = run.meter()
        req = send([r["mid_end"] for r in res_a], slow_phase_max)
        cut: dict[str, Any] = {"cut_off": False}
        resume: dict[str, Any] | None = None
        t_cut: float | None = None
        while time.monotonic() - t_slow < slow_phase_max:
            now = time.monotonic()
            if resume is None:
                hits = [e for e in run.servers.slow_closed() if e["client"] not in known]
                hit = next((e for e in hits if e["client"] == slow_uid), None)
                state = None
                if hit is None and not run.servers.log_dir:
                    state = run.pool.call_one(slow_proc, "tcp_state", {"idx": slow_idx}, timeout=10)
                if hit is not None or (state is not None and state != 1):
                    t_cut = now
                    cut = {
                        "cut_off": True,
                        "seen_after_s": round(now - t_slow, 3),
                        "source": "gateway log" if hit else f"tcp state {state}",
                    }
                    if hit:
                        cut["after_s"] = round(hit["time"] - t_slow_wall, 3)
                        cut["buffered_bytes"] = hit["buffered"]
                        cut["other_slow_closed"] = [e["client"] for e in hits if e is not hit]
                        # The gateway should drop the TCP connection CLOSE_TIMEOUT (5 s) after
                        # its close frame if the client does not answer: watch for it before
                        # reading again (reading would let the closing handshake finish).
                        cut["tcp"] = watch_tcp_close(run, slow_proc, slow_idx, TCP_CLOSE_WAIT_S)
                    resume = run.pool.call_one(slow_proc, "resume", {"idx": slow_idx}, timeout=15)
            elif now - t_slow >= phase and now - t_cut >= 2.0:
                break
            time.sleep(0.05)
        run.pool.call("stop_send", timeout=10)
        res_b = run.pool.wait(req, timeout=slow_phase_max + 30)
        if resume is None:
            resume = run.pool.call_one(slow_proc, "resume", {"idx": slow_idx}, timeout=15)
        sent_b = sum(r["sent"] for r in res_b)
        members = size - 1
        delivered_b = run.drain(base_delivered + sent_b * members, timeout=20) - base_delivered
        m_b = meter.stop()
        lat_b = percentiles(run.latencies())
        worst_b = run.timeline(t_slow_ns)
        spread_b = run.spread([(r["mid_lo"], r["mid_end"]) for r in res_b])
        check_b = _verify_room(
            run, [(r["mid_lo"], r["mid_end"]) for r in res_b], skip={slow_proc: [slow_idx]}
        )
        slow_lines = run.servers.slow_closed()
        rss = run.servers.rss()
    moved = (
        round(lat_b["p99_ms"] - lat_a["p99_ms"], 3)
        if lat_a["p99_ms"] is not None and lat_b["p99_ms"] is not None
        else None
    )
    ok = (
        check_a["lost"] == 0
        and check_a["duplicated"] == 0
        and check_b["lost"] == 0
        and check_b["duplicated"] == 0
        and cut_ok(cut, resume)
    )
    p99_ok = moved is not None and lat_b["p99_ms"] <= max(
        lat_a["p99_ms"] * 1.5, lat_a["p99_ms"] + 1
    )
    return {
        "ok": ok,
        "config": {
            "room_size": size,
            "says_per_s": s.rate,
            "content_chars": s.slow_content_size,
            "phase_s": phase,
            "slow_rcvbuf": 4096,
            "gateways": gateways,
            "workers": s.workers,
            "max_send_buffer": "gateway default (1 MiB)"
            if not any("--max-send-buffer" in a for a in s.gateway_args)
            else s.gateway_args,
        },
        "metrics": {
            **setup,
            "slow_uid": slow_uid,
            "cut_off": cut,
            "slow_close": resume,
            "stats_slow_closed_log_lines": len(slow_lines),
            "phase_a": {
                "says": sent_a,
                "deliveries": delivered_a,
                **{f"latency_{k}": v for k, v in lat_a.items()},
                "cpu": m_a,
                "worst_windows_s_ms": worst_a,
                **spread_a,
                **check_a,
            },
            "phase_b": {
                "says": sent_b,
                "deliveries": delivered_b,
                **{f"latency_{k}": v for k, v in lat_b.items()},
                "cpu": m_b,
                "worst_windows_s_ms": worst_b,
                **spread_b,
                **check_b,
            },
            "p99_moved_ms": moved,
            "room_fixed_p99_ms": s.room_fixed_p99,
            **rss,
        },
        "targets": [
            {
                "name": "others_p99_unmoved",
                "value": lat_b["p99_ms"],
                "target": f"<= max(1.5 x {lat_a['p99_ms']}, +1 ms)",
                "met": bool(p99_ok),
                "unit": "ms",
            },
            {
                "name": "slow_cut_off_1008",
                "value": resume.get("close_code") if resume else None,
                "target": "close 1008 seen, or logged and TCP dropped",
                "met": cut_ok(cut, resume),
            },
            *(
                [
                    {
                        "name": "slow_tcp_dropped",
                        "value": cut["tcp"].get("after_cut_s"),
                        "target": f"TCP gone within {TCP_CLOSE_WAIT_S} s of the cut-off",
                        "met": bool(cut["tcp"].get("dropped")),
                        "unit": "s",
                    }
                ]
                if "tcp" in cut
                else []
            ),
        ],
        "summary": f"one of {size} stops reading: p99 of the others {lat_a['p99_ms']} -> "
        f"{lat_b['p99_ms']} ms; cut off {cut.get('after_s', cut.get('seen_after_s'))} s after, "
        f"close code {resume and resume.get('close_code')}",
    }


# Profiling


class Profiler:
    """py-spy on the first gateway and the first worker (collapsed stacks, non-blocking).

    py-spy runs on the load core so that the servers' core is disturbed as little as
    possible; it still costs the profiled process a little, so profiled runs are for
    naming hot functions, not for the figures.
    """

    def __init__(self, s: Settings, servers: Servers, duration: float, tag: str) -> None:
        import shutil
        import sys

        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(spy):
            s.log("py-spy not found (pip install py-spy): no profile")
            return
        s.out_dir.mkdir(parents=True, exist_ok=True)
        cpus = s.load_cpus
        for role, pids in (("gateway", servers.gateway_pids), ("worker", servers.worker_pids)):
            if not pids:
                continue
            raw = s.out_dir / f"{tag}-{role}-{pids[0]}.collapsed.txt"
            cmd = [
                spy,
                "record",
                "--pid",
                str(pids[0]),
                "--duration",
                str(max(1, int(duration))),
                "--nonblocking",
                "--rate",
                "250",
                "--format",
                "raw",
                "-o",
                str(raw),
            ]
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
            self.procs.append((role, proc, raw))

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, proc, raw in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            out[role] = summarize_collapsed(raw)
        return out


def summarize_collapsed(raw: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive shares of the hottest functions in a py-spy raw (collapsed) file."""
    if not raw.exists():
        return {"error": "py-spy wrote nothing"}
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        samples += count
        frames = stack.split(";")
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for f in set(frames):
            total_counts[f] = total_counts.get(f, 0) + count
    if not samples:
        return {"samples": 0}

    def share(d: dict[str, int]) -> list[list[Any]]:
        return [
            [f, round(100 * c / samples, 1)]
            for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]
        ]

    return {
        "samples": samples,
        "collapsed": str(raw),
        "top_self_pct": share(self_counts),
        "top_inclusive_pct": share(total_counts),
    }


from bench.publisher import publisher  # noqa: E402 (it needs target() above)

SCENARIOS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "floor": floor,
    "idle": idle,
    "room_fixed": room_fixed,
    "room_max": room_max,
    "private": private,
    "login_storm": login_storm,
    "handshakes": handshakes,
    "slow_consumer": slow_consumer,
    "publisher": publisher,
}
