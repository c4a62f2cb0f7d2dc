"""``python -m bench``: benchmark the chat cluster on loopback.

Starts its own register, gateways and workers on free loopback ports for each
scenario (or targets a running cluster with ``--url`` and ``--register``), drives
them from several load processes, prints one JSON line per scenario on stdout
as it finishes, then a table. Progress goes to stderr.

Scenarios: floor, idle, room_fixed, room_max, private, login_storm, handshakes,
slow_consumer. Server CPU is utime + stime of the gateway and worker processes
(/proc/PID/stat) over the scenario; "x floor" divides a per-delivery cost by the
measured CPU of one plain send() of the same frame on loopback.

Exit status: 0 when every scenario ran and lost, duplicated or misrouted
nothing (missed performance targets are reported, not failed); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.loadproc import raise_nofile
from bench.scenarios import SCENARIOS, Settings

DEFAULT_ORDER = [
    "floor",
    "idle",
    "room_fixed",
    "room_max",
    "private",
    "login_storm",
    "handshakes",
    "slow_consumer",
    "publisher",
]

QUICK = {
    "connections": 2000,
    "duration": 2.0,
    "room_size": 200,
    "rate": 50.0,
    "private_clients": 200,
    "private_rate": 500.0,
    "private_room": 50,
    "storm_clients": 200,
    "max_says": 5000,
    "floor_connections": 200,
    "floor_sends": 50_000,
    "load_procs": 2,
    "handshake_concurrency": 16,
    "slow_content_size": 4000,
    "slow_rate": 200.0,
    "slow_phase_max": 20.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_ORDER),
        help=f"comma-separated, run in this order (default: {','.join(DEFAULT_ORDER)})",
    )
    p.add_argument(
        "--connections",
        type=int,
        help="idle: connections to hold (default 30000 = 2 x 15,000; up to 100000: "
        "gateways are added so none holds more than 19,000)",
    )
    p.add_argument(
        "--gateways",
        type=int,
        help="gateway processes (default: 1, idle: max(2, ceil(connections / 19000)))",
    )
    p.add_argument("--workers", type=int, help="business worker processes (default 1)")
    p.add_argument("--duration", type=float, help="seconds of traffic per scenario (default 10)")
    p.add_argument("--room-size", type=int, help="clients in the room (default 1000)")
    p.add_argument("--rate", type=float, help="room_fixed/slow_consumer says per second (50)")
    p.add_argument("--window", type=int, help="room_max: says outstanding at once (default 32)")
    p.add_argument("--max-says", type=int, help="room_max: says at most (default 50000)")
    p.add_argument("--private-clients", type=int, help="private: clients (default 2000)")
    p.add_argument("--private-rate", type=float, help="private: messages/s in all (2000)")
    p.add_argument("--storm-clients", type=int, help="login_storm: clients (default 1000)")
    p.add_argument("--content-size", type=int, help="chars of content per say (default 60)")
    p.add_argument("--load-procs", type=int, help="load processes (default 4)")
    p.add_argument("--quick", action="store_true", help="small sizes: the whole run in < 60 s")
    p.add_argument(
        "--pin",
        choices=["both", "servers", "none"],
        default="both",
        help="both (default): servers on CPU 0, load processes on CPU 1; servers: servers on "
        "CPU 0, load anywhere; none: no affinity",
    )
    p.add_argument("--url", help="target a running cluster: ws://HOST:PORT of a gateway")
    p.add_argument("--register", help="register of that cluster, for gateway/worker pids")
    p.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra argument for every gateway we start (repeatable, e.g. "
        "--gateway-arg=--max-send-buffer=262144)",
    )
    p.add_argument(
        "--scenario-timeout",
        type=float,
        help="hard limit per scenario in seconds (default 300, --quick 90)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the gateway during room_max")
    p.add_argument(
        "--out",
        default="bench/output",
        help="directory for cluster logs and profiles (default bench/output)",
    )
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings()
    if args.quick:
        s.quick = True
        for k, v in QUICK.items():
            setattr(s, k, v)
    for name in (
        "connections",
        "gateways",
        "workers",
        "duration",
        "room_size",
        "rate",
        "window",
        "max_says",
        "private_clients",
        "private_rate",
        "storm_clients",
        "content_size",
        "load_procs",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    s.pin = args.pin
    s.url = args.url
    s.register = args.register
    s.gateway_args = list(args.gateway_arg)
    s.profile = args.profile
    s.out_dir = Path(args.out)
    s.log = log
    return s


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def key_figures(r: dict[str, Any]) -> list[tuple[str, Any]]:
    m = r.get("metrics", {})
    name = r["scenario"]
    cpu = m.get("cpu", {})
    out: list[tuple[str, Any]] = []
    if name == "floor":
        out = [("us/send", m.get("floor_us")), ("frame B", m.get("frame_bytes"))]
    elif name == "idle":
        out = [
            ("conns", m.get("open_after_hold")),
            ("KiB/conn", m.get("kib_per_conn")),
            ("connects/s", m.get("connects_per_s")),
        ]
    elif name in ("room_fixed", "room_max"):
        out = [
            ("deliv/s", m.get("deliveries_per_s")),
            ("us/deliv", m.get("server_us_per_delivery")),
            ("x floor", m.get("x_floor")),
        ]
        if name == "room_fixed":
            out += [("p50 ms", m.get("latency_p50_ms")), ("p99 ms", m.get("latency_p99_ms"))]
        else:
            out += [("x GW", m.get("x_gatewayworker"))]
    elif name == "private":
        out = [
            ("msg/s", m.get("messages_per_s")),
            ("us/msg", m.get("server_us_per_message")),
            ("p50 ms", m.get("latency_p50_ms")),
            ("p99 ms", m.get("latency_p99_ms")),
        ]
    elif name == "publisher":
        out = [
            ("p50 ms", m.get("latency_p50_ms")),
            ("p99 ms", m.get("latency_p99_ms")),
            ("sends/s", m.get("flat_sends_per_s")),
        ]
    elif name == "login_storm":
        out = [("complete s", m.get("complete_s")), ("x GW", m.get("x_gatewayworker"))]
    elif name == "handshakes":
        out = [
            ("per gw/s", m.get("per_gateway_per_s")),
            ("gw us each", m.get("gateway_us_per_handshake")),
        ]
    elif name == "slow_consumer":
        a, b = m.get("phase_a", {}), m.get("phase_b", {})
        cut = m.get("cut_off", {})
        close = m.get("slow_close") or {}
        out = [
            ("p99 ms before", a.get("latency_p99_ms")),
            ("after", b.get("latency_p99_ms")),
            ("cut s", cut.get("after_s", cut.get("seen_after_s"))),
            ("code", close.get("close_code")),
        ]
    if cpu:
        out += [
            ("srv CPU%", cpu.get("server_cpu_pct")),
            ("cli CPU%", cpu.get("client_cpu_pct")),
            ("other CPU%", cpu.get("others_cpu_pct")),
            ("steal%", cpu.get("steal_pct")),
        ]
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    header = f"{'scenario':<14} {'ok':<4} {'targets':<26} figures"
    lines.append(header)
    lines.append("-" * 110)
    for r in results:
        targets = r.get("targets", [])
        t = " ".join(f"{x['name'].split('_')[0]}:{'met' if x['met'] else 'MISS'}" for x in targets)
        figs = "  ".join(f"{k} {fmt(v)}" for k, v in key_figures(r))
        ok = "yes" if r.get("ok") else "NO"
        lines.append(f"{r['scenario']:<14} {ok:<4} {t[:26]:<26} {figs}")
        if r.get("error"):
            lines.append(f"{'':<14} error: {r['error'].splitlines()[0][:90]}")
    lines.append("")
    for r in results:
        for x in r.get("targets", []):
            lines.append(
                f"  {r['scenario']:<14} {x['name']:<26} {fmt(x['value']):>12} "
                f"{x.get('unit', ''):<3} target {x['target']:<24} {'met' if x['met'] else 'MISSED'}"
            )
    return "\n".join(lines)


class ScenarioTimeout(Exception):
    pass


def _timed_out(signum: int, frame: Any) -> None:
    raise ScenarioTimeout("scenario over its hard time limit (--scenario-timeout)")


def loopback_only(url: str | None) -> None:
    """Refuse any target outside 127.0.0.0/8: this benchmark sends load only to loopback."""
    if not url:
        return
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    for info in socket.getaddrinfo(host, None, socket.AF_INET):
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise SystemExit(f"--url {url}: {info[4][0]} is not a loopback address; refusing")


def source_version() -> str:
    """The commit under test, with "+dirty" when the work tree has changes."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    s = settings_from(args)
    loopback_only(s.url)
    if s.register:
        loopback_only("tcp://" + s.register.split("://")[-1])
    if args.scenario_timeout is None:
        args.scenario_timeout = 90 if args.quick else 300
    raise_nofile()
    if s.server_cpus:
        log(f"pinning: servers on CPU {s.server_cpus}, load processes on CPU {s.load_cpus}")
    # Figures are given as ratios to the floor: measure it first even if not asked for.
    if "floor" not in names and any(
        n in names for n in ("room_fixed", "room_max", "private", "slow_consumer")
    ):
        names.insert(0, "floor")
    results = []
    t_start = time.monotonic()
    for name in names:
        log(f"{name}: starting")
        t0 = time.monotonic()
        signal.signal(signal.SIGALRM, _timed_out)
        signal.alarm(int(args.scenario_timeout))
        try:
            r = SCENARIOS[name](s)
        except Exception as exc:
            r = {"ok": False, "error": f"{exc!r}\n{traceback.format_exc()}"}
        finally:
            signal.alarm(0)
        r = {
            "scenario": name,
            **r,
            "seconds": round(time.monotonic() - t0, 1),
            "source": source_version(),
            "pin": s.pin,
        }
        results.append(r)
        print(json.dumps(r, separators=(",", ":"), default=str), flush=True)
        log(f"{name}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s: {r.get('summary', '')}")
        if r.get("error"):
            log(r["error"])
    print()
    print(table(results))
    print(f"\ntotal {time.monotonic() - t_start:.0f} s; logs in {s.out_dir}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
