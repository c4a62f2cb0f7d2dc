"""The floor: CPU of one plain non-blocking ``send()`` of a broadcast frame on loopback.

A sender process (on the servers' core) writes the same frame, round robin, to
``connections`` loopback TCP sockets; a reader process (on the load core) drains
them all with epoll. The sender's utime + stime per successful send is the
floor: on loopback the receiver's TCP work runs on the sender's CPU, so this is
what one delivery costs the kernel when nothing is batched. Every server figure
is also given as a ratio to it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import select
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

from bench.harness import busy_fraction, cpu_times
from bench.loadproc import raise_nofile


def _reader(pipe: Connection, connections: int, cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    raise_nofile()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    pipe.send(listener.getsockname())
    socks = []
    for _ in range(connections):
        s, _ = listener.accept()
        s.setblocking(False)
        socks.append(s)
    ep = select.epoll()
    by_fd = {}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
    pipe.send("accepted")
    received = 0
    pipe_fd = pipe.fileno()
    ep.register(pipe_fd, select.EPOLLIN)
    while True:
        for fd, _ in ep.poll():
            if fd == pipe_fd:
                pipe.recv()
                pipe.send(received)
                return
            try:
                while True:
                    chunk = by_fd[fd].recv(262144)
                    if not chunk:
                        break
                    received += len(chunk)
                    if len(chunk) < 262144:
                        break
            except BlockingIOError:
                pass


def _sender(
    pipe: Connection,
    address: tuple[str, int],
    connections: int,
    frame: bytes,
    sends: int,
    cpus: list[int] | None,
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    raise_nofile()
    socks = []
    for _ in range(connections):
        s = socket.create_connection(address)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    pipe.send("connected")
    pipe.recv()  # reader accepted everything
    rounds = max(1, sends // connections)
    # warm-up round
    for s in socks:
        s.send(frame)
    time.sleep(0.2)
    ok = again = 0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = cpu_times()
    t0 = time.perf_counter()
    for _ in range(rounds):
        for s in socks:
            try:
                s.send(frame)
                ok += 1
            except BlockingIOError:
                again += 1
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = cpu_times()
    # The Python loop alone (the same calls without the syscall), to separate it out.
    noop = _Noop()
    lst = [noop] * connections
    n0 = time.perf_counter()
    for _ in range(max(1, rounds // 4)):
        for s in lst:
            with contextlib.suppress(BlockingIOError):
                s.send(frame)
    n1 = time.perf_counter()
    loop_us = (n1 - n0) / (max(1, rounds // 4) * connections) * 1e6
    pipe.send(
        {
            "sends": ok,
            "eagain": again,
            "wall_s": t1 - t0,
            "utime_s": r1.ru_utime - r0.ru_utime,
            "stime_s": r1.ru_stime - r0.ru_stime,
            "core_busy": busy_fraction(c0, c1),
            "python_loop_us": loop_us,
        }
    )
    pipe.recv()
    for s in socks:
        s.close()


class _Noop:
    def send(self, data: bytes) -> int:
        return len(data)


def measure(
    frame: bytes,
    connections: int = 1000,
    sends: int = 300_000,
    sender_cpus: list[int] | None = None,
    reader_cpus: list[int] | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    rp, rc = ctx.Pipe()
    sp, sc = ctx.Pipe()
    reader = ctx.Process(target=_reader, args=(rc, connections, reader_cpus), daemon=True)
    reader.start()
    try:
        if not rp.poll(timeout):
            raise TimeoutError("floor reader did not start")
        address = rp.recv()
        sender = ctx.Process(
            target=_sender,
            args=(sc, address, connections, frame, sends, sender_cpus),
            daemon=True,
        )
        sender.start()
        try:
            for pipe, what in ((sp, "connected"), (rp, "accepted")):
                if not pipe.poll(timeout):
                    raise TimeoutError(f"floor: not {what} in {timeout} s")
                pipe.recv()
            sp.send("go")
            if not sp.poll(timeout):
                raise TimeoutError(f"floor: sender not done in {timeout} s")
            result = sp.recv()
            time.sleep(0.2)
            rp.send("stop")
            received = rp.recv() if rp.poll(10) else None
            sp.send("bye")
        finally:
            sender.join(5)
            if sender.is_alive():
                sender.kill()
    finally:
        reader.join(5)
        if reader.is_alive():
            reader.kill()
    cpu = result["utime_s"] + result["stime_s"]
    sends_ok = result["sends"]
    return {
        "frame_bytes": len(frame),
        "connections": connections,
        "sends": sends_ok,
        "eagain": result["eagain"],
        "floor_us": round(cpu / sends_ok * 1e6, 3) if sends_ok else None,
        "utime_us": round(result["utime_s"] / sends_ok * 1e6, 3) if sends_ok else None,
        "stime_us": round(result["stime_s"] / sends_ok * 1e6, 3) if sends_ok else None,
        "wall_us": round(result["wall_s"] / sends_ok * 1e6, 3) if sends_ok else None,
        "python_loop_us": round(result["python_loop_us"], 3),
        "core_busy": result["core_busy"],
        "bytes_read": received,
        "bytes_expected": (sends_ok + connections) * len(frame),
    }
