"""Faults that are not only kills, under chat load, in one supervised cluster.

200 members in one room over 2 gateways and 4 workers, 4 of them saying a
numbered line every 40 ms (100 says/s, 20,000 deliveries/s). One after the
other: a worker paused 10 s (SIGSTOP, SIGCONT), a gateway paused 10 s, a
worker SIGKILLed, a gateway SIGKILLed. After each: 0 lost, 0 duplicated, 0 out
of order for every member that stayed connected; everyone who was closed
came back; a newcomer's user_list holds exactly the connected members; nobody
was logged out twice. Each round is decided by markers, not by time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.deploy.chatter import Room
from tests.deploy.test_supervisor_faults import OneMachine, one_machine
from tests.deploy.traffic import gateway_of

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(420)]

PAUSE = 10.0


def wait_for(m: OneMachine, log: str, text: str, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while m.sup.logs(log).count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not in {log}"
        time.sleep(0.1)


def pause(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(PAUSE)  # the fault itself: a process that stands still this long
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_pauses_and_kills_lose_nothing_and_run_nothing_twice() -> None:
    async with one_machine(gateways=2, workers=4) as m:
        room = Room(m.url, size=200, senders=4)
        await room.open()
        status = m.status()
        assert status is not None
        by_pid: dict[int, list] = {}
        for member in room.members:
            by_pid.setdefault(gateway_of(member.uid, status)["pid"], []).append(member)
        assert len(by_pid) == 2, "the kernel put every member on one gateway"
        names = {i["pid"]: n for n, i in m.sup.infos().items() if n.startswith("gateway")}
        steady, other = sorted(by_pid, key=lambda pid: -len(by_pid[pid]))
        room.choose_senders(by_pid[steady])  # senders stay connected through every round
        victim = names[other]
        results = {}
        try:

            def pause_worker() -> None:
                pause(m.sup.pid("worker:worker0"))
                wait_for(m, "worker0.log", "loop stood still")
                m.wait_mesh()

            def pause_gateway() -> None:
                pause(m.sup.pid(victim))
                wait_for(m, f"{victim.split(':')[1]}.log", "this gateway was declared gone")
                m.wait_mesh()

            def kill_worker() -> None:
                old = m.sigkill("worker:worker1")
                m.wait_restarted("worker:worker1", old)

            def kill_gateway() -> None:
                old = m.sigkill(victim)
                m.wait_restarted(victim, old)

            for name, fault in [
                ("worker paused 10 s", pause_worker),
                ("gateway paused 10 s", pause_gateway),
                ("worker SIGKILLed", kill_worker),
                ("gateway SIGKILLed", kill_gateway),
            ]:
                now = m.status()
                assert now is not None
                held = next(g for g in now["gateways"] if g["pid"] == other)["prefixes"]
                on_victim = sum(1 for x in room.members if x.uid >> 22 in held)
                result = results[name] = await room.round(fault)
                print(f"{name}: {result}")
                assert not room.errors(), room.errors()[:5]
                assert (result.lost, result.duplicated, result.out_of_order) == (0, 0, 0), name
                assert result.reconnected == (on_victim if "gateway" in name else 0), name
                await asyncio.wait_for(room.assert_rosters_true(), 60)
                assert not room.logged_out_twice(), name
        finally:
            await asyncio.wait_for(room.close(), 60)
            for name, result in results.items():
                print(f"{name}: {result}")
