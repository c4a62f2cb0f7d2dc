"""Faults on the supervisor deployment: `deploy/run all -n` with free loopback ports.

Each test starts its own supervisord (register, 2 gateways sharing one port, workers,
the page) from a settings file, exactly as an operator would, hurts it, and checks that
no connection closes that need not and no accepted message is lost. At the end every
program must stop on supervisor's signal with status 0, none killed after stopwaitsecs.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from businessworker.testing import TIMEOUT
from tests.chat import ChatClient
from tests.cluster import ROOT, free_port
from tests.deploy.supervised import DEPLOY, Supervised, local_status, wait_mesh
from tests.deploy.traffic import Traffic, gateway_of, login_room, open_clients

pytestmark = pytest.mark.deploy


@dataclass
class OneMachine:
    sup: Supervised
    register: str
    port: int
    gateways: int
    workers: int
    killed: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def status(self) -> dict[str, Any] | None:
        return local_status(self.register, self.sup.keys)

    def wait_mesh(self, gateways: int | None = None, workers: int | None = None) -> dict:
        return wait_mesh(
            self.status,
            self.gateways if gateways is None else gateways,
            self.workers if workers is None else workers,
            what=self.sup.logs("supervisord*"),
        )

    def sigkill(self, name: str) -> int:
        pid = self.sup.pid(name)
        os.kill(pid, signal.SIGKILL)
        self.killed += 1
        return pid

    def wait_restarted(self, name: str, old: int, timeout: float = 10) -> float:
        """Seconds until supervisor runs ``name`` again with a new pid, linked everywhere."""
        start = time.monotonic()
        while True:
            info = self.sup.infos()[name]
            if info["statename"] == "RUNNING" and info["pid"] not in (0, old):
                break
            assert time.monotonic() - start < timeout, f"{name} not restarted: {info}"
            time.sleep(0.1)
        self.wait_mesh()
        return time.monotonic() - start


def settings(register: str, port: int, gateways: int, workers: int, **extra: Any) -> dict:
    return {
        "CHAT_REGISTER": register,
        "CHAT_REGISTER_BIND": register,
        "CHAT_LISTEN": f"127.0.0.1:{port}",
        "CHAT_GATEWAYS": gateways,
        "CHAT_WORKERS": workers,
        "CHAT_WEB_PORT": 0,
        "CHAT_WEB_ARGS": "--host 127.0.0.1",
        **extra,
    }


@asynccontextmanager
async def one_machine(
    gateways: int = 2, workers: int = 3, **extra: Any
) -> AsyncIterator[OneMachine]:
    """The one-machine role on free ports. Blocking steps run in a thread, so that the
    test's clients keep answering (a stopping gateway waits for their close handshake)."""
    register, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    sup = Supervised("all", settings(register, port, gateways, workers, **extra))
    machine = OneMachine(sup, register, port, gateways, workers)
    await asyncio.to_thread(sup.start)
    try:
        await asyncio.to_thread(sup.wait_running)
        await asyncio.to_thread(machine.wait_mesh)
        yield machine
    finally:
        log = await asyncio.to_thread(sup.stop)
    sup.assert_stopped_cleanly(log, killed=machine.killed)
    sup.cleanup()


def wait_log(sup: Supervised, name: str, text: str, timeout: float = TIMEOUT) -> None:
    """Until the log ``name`` of ``sup`` holds ``text`` (a fact, not a delay)."""
    deadline = time.monotonic() + timeout
    while text not in sup.logs(name):
        assert time.monotonic() < deadline, f"{name} never logged {text!r}"
        time.sleep(0.05)


def assert_open(clients: list[ChatClient]) -> None:
    closed = [c.uid for c in clients if c.ws.state.name != "OPEN"]
    assert not closed, f"connections closed: {closed}"


async def test_sigkilled_worker_is_restarted_and_no_message_is_lost() -> None:
    async with one_machine(workers=3) as m:
        clients = await open_clients(m.url, 8)
        await login_room(clients, "kill")
        traffic = Traffic([clients])

        def fault() -> None:
            old = m.sigkill("worker:worker0")
            took = m.wait_restarted("worker:worker0", old)
            print(f"worker restarted and linked again in {took:.1f} s")

        took = await traffic.run(fault, at=50, after=50)
        await traffic.settle()
        print(f"{traffic.lines()} lines, {traffic.repeated()} repeated (at least once)")
        assert took < 10
        assert not traffic.errors, traffic.errors[:5]
        assert not traffic.missing(), traffic.missing()[:5]
        assert_open(clients)
        assert "terminated by SIGKILL" in m.sup.supervisord_log()
        assert_page_served(m)


def assert_page_served(m: OneMachine) -> None:
    """The one-machine role also serves the chat page (here on a free port)."""
    port = int(m.sup.logs("web.log").split("http://127.0.0.1:")[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        status_line = s.makefile("rb").readline()
    assert status_line.split()[1] == b"200", status_line


async def test_sigkilled_gateway_clients_are_logged_out_and_reconnect() -> None:
    async with one_machine(workers=2) as m:
        # Both gateways share the port; the kernel spreads 16 clients over both.
        status = m.status()
        clients = await open_clients(m.url, 16)
        await login_room(clients, "gw")
        by_gateway: dict[int, list[ChatClient]] = {}
        for c in clients:
            by_gateway.setdefault(gateway_of(c.uid, status)["pid"], []).append(c)
        assert len(by_gateway) == 2, "the kernel put every client on one gateway"
        victim_pid = min(by_gateway, key=lambda pid: len(by_gateway[pid]))
        victims = by_gateway[victim_pid]
        survivors = [c for c in clients if c not in victims]
        name = next(n for n, i in m.sup.infos().items() if i["pid"] == victim_pid)

        start = time.monotonic()
        m.sigkill(name)
        for v in victims:  # no close frame: the process is gone
            await v.closed()
        lost = {v.uid for v in victims}

        async def logouts(client: ChatClient) -> float:
            seen: set[int] = set()
            while seen != lost:
                left = 8 - (time.monotonic() - start)
                try:
                    message = await client.recv(timeout=max(left, 0.01))
                except TimeoutError:
                    raise AssertionError(
                        f"client {client.uid} saw logouts of {len(seen)} of the {len(lost)} "
                        "clients of the killed gateway within 8 s (core: on_close on gateway "
                        "death)"
                    ) from None
                assert message["type"] == "logout", message
                seen.add(message["uid"])
            return time.monotonic() - start

        delays = await asyncio.gather(*(logouts(s) for s in survivors))
        print(f"{len(victims)} logouts seen by {len(survivors)} clients after {max(delays):.1f} s")
        assert_open(survivors)

        # Supervisor restarts the gateway; the dropped clients come back through the port.
        took = await asyncio.to_thread(m.wait_restarted, name, victim_pid)
        print(f"gateway restarted and linked after {took:.1f} s")
        again = await open_clients(m.url, len(victims))
        for i, client in enumerate(again):
            users = await client.login(f"back-{i}", room="gw")
            assert len(users) == len(survivors) + i + 1
            for other in survivors + again[:i]:
                assert (await other.expect("login"))["uid"] == client.uid
        await again[0].say("welcome back")
        for client in survivors + again:
            assert (await client.expect("say"))["content"] == "welcome back"


async def test_register_down_10s_chat_goes_on_and_newcomers_join_when_it_is_back() -> None:
    async with one_machine(gateways=2, workers=2) as m:
        clients = await open_clients(m.url, 6)
        await login_room(clients, "reg")
        traffic = Traffic([clients])
        new_port = free_port()
        newcomers: list[Supervised] = []

        def fault() -> None:
            m.sup.rpc.stopProcess("register", True)
            down = time.monotonic()
            assert m.status() is None
            # A new gateway host and a new worker host start while it is down.
            # (this machine's account: the same default cluster key)
            common = {
                "CHAT_REGISTER": m.register,
                "CHAT_STATE_DIR": m.sup.settings["CHAT_STATE_DIR"],
            }
            gateway = Supervised(
                "gateway",
                {**common, "CHAT_GATEWAYS": 1, "CHAT_LISTEN": f"127.0.0.1:{new_port}"},
                label="newgw",
            )
            worker = Supervised("worker", {**common, "CHAT_WORKERS": 1}, label="newwk")
            newcomers.extend([gateway, worker])
            for sup in newcomers:
                sup.start().wait_running()
            time.sleep(max(0.0, 10 - (time.monotonic() - down)))
            m.sup.rpc.startProcess("register", True)
            wait_mesh(m.status, 3, 3, timeout=15)

        try:
            took = await traffic.run(fault, at=50, after=50, pace=0.02)
            await traffic.settle()
            print(f"{traffic.lines()} lines over {took:.1f} s of register downtime")
            assert not traffic.errors, traffic.errors[:5]
            assert not traffic.missing(), traffic.missing()[:5]
            assert traffic.repeated() == 0  # no worker died: exactly once
            assert not traffic.out_of_order()
            assert_open(clients)

            # The newcomer gateway serves the same room: the user list is cluster-wide.
            late = await ChatClient.open(f"ws://127.0.0.1:{new_port}/")
            users = await late.login("late", room="reg")
            assert len(users) == len(clients) + 1
            for c in clients:
                assert (await c.expect("login"))["uid"] == late.uid
            # Only the newcomer worker is left: it handles the chat.
            await asyncio.to_thread(m.sup.rpc.stopProcessGroup, "worker", True)
            await asyncio.to_thread(wait_mesh, m.status, 3, 1)
            await late.say("from the new gateway, via the new worker")
            for c in [*clients, late]:
                assert (await c.expect("say"))["content"].startswith("from the new gateway")
            # Workers back, so that every gateway's drain at the end has workers to run
            # on_close (a gateway without workers waits out its drain time).
            await asyncio.to_thread(m.sup.rpc.startProcessGroup, "worker", True)
        finally:
            logs = await asyncio.gather(*(asyncio.to_thread(sup.stop) for sup in newcomers))
            failed = sys.exc_info()[0] is not None
            for sup, log in zip(newcomers, logs, strict=True):
                sup.assert_stopped_cleanly(log)
                if not failed:
                    sup.cleanup()


async def test_reload_workers_with_200_clients_closes_nothing_and_loses_nothing() -> None:
    async with one_machine(gateways=2, workers=4) as m:
        clients = await open_clients(m.url, 200)
        rooms = [clients[i : i + 10] for i in range(0, 200, 10)]
        await asyncio.gather(*(login_room(room, f"room{i}") for i, room in enumerate(rooms)))
        traffic = Traffic(rooms)
        reload_output: list[str] = []

        def reload() -> None:
            run = subprocess.run(
                [str(DEPLOY / "reload-workers"), "all"],
                cwd=ROOT,
                env=m.sup.env(),
                capture_output=True,
                text=True,
                timeout=90,
            )
            reload_output.append(run.stdout + run.stderr)
            assert run.returncode == 0, run.stdout + run.stderr

        before = {n: i["pid"] for n, i in m.sup.infos().items() if n.startswith("worker:")}
        took = await traffic.run(reload, at=40, after=40, pace=0.01, max_lines=6000, max_time=90)
        await traffic.settle()
        print(reload_output[0])
        print(f"{traffic.lines()} lines in 20 rooms during a {took:.1f} s reload")
        after = {n: i["pid"] for n, i in m.sup.infos().items() if n.startswith("worker:")}
        assert all(before[n] != after[n] for n in before), (before, after)
        assert not traffic.errors, traffic.errors[:5]
        assert not traffic.missing(), traffic.missing()[:5]
        assert traffic.repeated() == 0  # clean stops: exactly once
        assert not traffic.out_of_order()
        assert_open(clients)
        await asyncio.to_thread(m.wait_mesh)


def gateway_has(option: str) -> bool:
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    return option in run.stdout


async def test_a_stopping_gateway_drains_in_batches_within_its_drain_time() -> None:
    batch, drain_time = 10, 3.0
    assert gateway_has("--drain-batch") and gateway_has("--drain-time"), (
        "python -m gateway has no --drain-batch/--drain-time yet (core part not in)"
    )
    args = f"--drain-batch {batch} --drain-time {drain_time:g}"
    async with one_machine(gateways=2, workers=2, CHAT_GATEWAY_ARGS=args) as m:
        status = m.status()
        clients = await open_clients(m.url, 160)
        for i, c in enumerate(clients):  # a room each: cheap, and it gives the uid
            await c.login(f"d{i}", room=f"d{i}")
        pids = {c.uid: gateway_of(c.uid, status)["pid"] for c in clients}
        stopping = m.sup.pid("gateway:gateway0")
        other = next(g for g in status["gateways"] if g["pid"] != stopping)
        victims = [c for c in clients if pids[c.uid] == stopping]
        stayers = [c for c in clients if pids[c.uid] != stopping]
        assert len(victims) > 2 * batch, f"only {len(victims)} clients on gateway0"

        codes = asyncio.gather(*(c.closed(timeout=drain_time + TIMEOUT) for c in victims))
        stop = asyncio.ensure_future(
            asyncio.to_thread(m.sup.rpc.stopProcess, "gateway:gateway0", True)
        )
        # The gateway logs its drain once it closed its port: it accepts no more.
        await asyncio.to_thread(wait_log, m.sup, "gateway0.log", "draining clients=")
        newcomers = await open_clients(m.url, 10)
        for i, c in enumerate(newcomers):
            await c.login(f"new{i}", room="new")
            assert c.uid >> 22 in other["prefixes"], "a new client reached the draining gateway"
        closes = await codes
        await stop

        # The sizes and the time are the gateway's own (this process may lag behind it on
        # a loaded machine, and merge or split what it sees of the 50 ms ticks).
        log = m.sup.logs("gateway0.log")
        drain = re.search(r"draining clients=(\d+) batch=(\d+)", log)
        drained = re.search(
            r"drained in ([\d.]+) s, batches=(\d+) unanswered=(\d+) away=(\d+)", log
        )
        assert drain and drained, log[-2000:]
        n, size = int(drain[1]), int(drain[2])
        took, batches, unanswered = float(drained[1]), int(drained[2]), int(drained[3])
        print(
            f"{n} clients closed in {batches} batches of {size} in {took:.2f} s (the gateway's log)"
        )
        assert {code for code, _ in closes} <= {1001, 1012}, closes
        assert n == len(victims)  # every client of the gateway
        assert size == batch  # --drain-batch: 160 clients fit --drain-time at that size
        # one tick apart each (the gateway counts the turns in which it sent closes)
        assert batches == -(-n // size) >= 3, f"{n} clients, batch {size}: {batches} batches"
        assert took <= drain_time, took
        assert unanswered == 0  # each client answered its close within the drain time
        assert_open(stayers + newcomers)
        # Told to go elsewhere, they reconnect through the same port to the other gateway.
        back = await open_clients(m.url, 5)
        for i, c in enumerate(back):
            await c.login(f"back{i}", room="new")
            assert c.uid >> 22 in other["prefixes"]
        await asyncio.to_thread(m.sup.rpc.startProcess, "gateway:gateway0", True)
        await asyncio.to_thread(m.wait_mesh)
