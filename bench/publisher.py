"""The publisher scenario: pushes from an outside process (``businessworker.Cluster``).

One chat client logs in with "resume" (the chat binds its uid); another process,
the web app's stand-in, sends it a numbered text with its send time
(CLOCK_MONOTONIC, shared by the machine's processes) through a sync Cluster:

- paced: ``rate`` sends/s (1,000) for ``duration``, from PACED_THREADS threads
  sharing one Cluster (a call returns once the gateways confirmed it, about a
  millisecond and a half: one thread alone does not reach 1,000/s); latency from
  the call to the frame read by the client, p50/p99/max;
- flat out: one thread calling ``send_to_uid`` back to back for ``duration``, then
  FLAT_THREADS threads: sends/s of each.

Both processes run on the load CPU; the cluster on the server CPU.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from typing import Any

from bench.harness import percentiles, start_servers

TARGET_P99_MS = 10.0
PACED_THREADS = 4
FLAT_THREADS = 8


def _pin(cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def _receive(url: str, cpus: list[int] | None, uid_out: Any, expect: int, out: Any) -> None:
    """Log in, say our uid, then read ``expect`` numbered frames: their latencies (ns)."""
    import json

    from websockets.sync.client import connect

    _pin(cpus)
    latencies: list[int] = []
    seen: set[int] = set()
    with connect(url, compression=None, max_size=2**20) as ws:
        ws.send(json.dumps({"type": "login", "name": "bench", "room": "pub", "resume": True}))
        while True:
            message = json.loads(ws.recv(timeout=30))
            if message.get("type") == "user_list":
                uid_out.put(message["uid"])
                break
        deadline = time.monotonic() + 120
        while len(seen) < expect and time.monotonic() < deadline:
            frame = ws.recv(timeout=30)
            now = time.monotonic_ns()
            if not isinstance(frame, str) or not frame[:1].isdigit():
                continue  # the chat's own messages
            n, sent = frame.split(":")
            seen.add(int(n))
            latencies.append(now - int(sent))
    out.put({"latencies": latencies, "distinct": len(seen), "received": len(latencies)})


def _publish(
    register: str, env: dict[str, str], cpus: list[int] | None, uid: str, rate: float,
    duration: float, out: Any,
) -> None:  # fmt: skip
    os.environ.update(env)
    _pin(cpus)
    from businessworker import Cluster

    with Cluster(register) as cluster:
        cluster.connect()
        numbers = itertools.count()
        paced = int(rate * duration)
        start = time.monotonic() + 0.05

        def paced_thread(k: int) -> None:
            for i in range(k, paced, PACED_THREADS):
                pause = start + i / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                cluster.send_to_uid(uid, f"{next(numbers)}:{time.monotonic_ns()}")

        def flat_thread(until: float, counts: list[int]) -> None:
            while time.monotonic() < until:
                cluster.send_to_uid(uid, f"{next(numbers)}:{time.monotonic_ns()}")
                counts.append(1)

        def run(threads: list[threading.Thread]) -> float:
            began = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.monotonic() - began

        paced_s = run(
            [threading.Thread(target=paced_thread, args=(k,)) for k in range(PACED_THREADS)]
        )
        one: list[int] = []
        flat_s = run(
            [threading.Thread(target=flat_thread, args=(time.monotonic() + duration, one))]
        )
        many: list[int] = []
        until = time.monotonic() + duration
        many_s = run(
            [threading.Thread(target=flat_thread, args=(until, many)) for _ in range(FLAT_THREADS)]
        )
    out.put(
        {
            "paced": paced,
            "paced_s": paced_s,
            "flat": len(one),
            "flat_s": flat_s,
            "many": len(many),
            "many_s": many_s,
        }
    )


def publisher(s: Any) -> dict[str, Any]:
    rate = 1000.0
    duration = s.duration
    servers = start_servers(
        gateways=s.gateways or 2,
        workers=s.workers,
        gateway_args=list(s.gateway_args),
        pin=s.server_cpus,
        log_root=s.out_dir,
        url=s.url,
        register=s.register,
    )
    try:
        ctx = multiprocessing.get_context("spawn")
        uid_q, got_q, sent_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        host, port = servers.urls[0]
        # The receiver stops once it has every message; it cannot know the flat-out
        # count ahead, so it is told a bound and the publisher's count decides.
        expect = int(rate * duration) + 1
        receiver = ctx.Process(
            target=_receive, args=(f"ws://{host}:{port}/", s.load_cpus, uid_q, expect, got_q)
        )
        receiver.start()
        uid = str(uid_q.get(timeout=30))
        sender = ctx.Process(
            target=_publish,
            args=(servers.register, servers.env or {}, s.load_cpus, uid, rate, duration, sent_q),
        )
        sender.start()
        sent = sent_q.get(timeout=duration * 3 + 60)
        sender.join(30)
        got = got_q.get(timeout=60)
        receiver.join(30)
    finally:
        servers.stop()
    from bench.scenarios import target

    lat = percentiles(got["latencies"][: sent["paced"]])
    p99 = lat["p99_ms"]
    ok = got["distinct"] >= min(expect, sent["paced"])
    return {
        "ok": ok,
        "config": {"rate": rate, "duration_s": duration, "gateways": s.gateways or 2},
        "metrics": {
            "paced_sends": sent["paced"],
            "paced_rate": round(sent["paced"] / sent["paced_s"], 1),
            "latency_p50_ms": lat["p50_ms"],
            "latency_p99_ms": p99,
            "latency_max_ms": lat["max_ms"],
            "flat_sends_per_s": round(sent["flat"] / sent["flat_s"], 1),
            "flat_sends_per_s_8_threads": round(sent["many"] / sent["many_s"], 1),
            "received": got["received"],
        },
        "targets": [target("publish p99", p99, TARGET_P99_MS, at_most=True, unit="ms")],
    }
