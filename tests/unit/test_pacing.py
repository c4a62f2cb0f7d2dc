"""Pacer: a quiet link flushes at the end of the turn, a busy one at most once per pace."""

from __future__ import annotations

import asyncio

from gateway.pacing import Pacer


class Owner:
    """Counts flushes and, like a link, tells the pacer when it sent."""

    def __init__(self, pace: float) -> None:
        self.flushes: list[float] = []
        self.flushed = asyncio.Event()
        self.pacer = Pacer(self.flush, pace)

    def flush(self) -> None:
        self.flushes.append(asyncio.get_running_loop().time())
        self.pacer.sent()
        self.flushed.set()


async def test_a_quiet_link_flushes_at_the_end_of_the_turn_once() -> None:
    owner = Owner(pace=0.05)
    for _ in range(3):
        owner.pacer.schedule()
    assert owner.flushes == []  # not before the turn ends
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(owner.flushes) == 1


async def test_a_busy_link_waits_for_the_pace_after_its_last_send() -> None:
    owner = Owner(pace=0.05)
    owner.pacer.schedule()
    await asyncio.wait_for(owner.flushed.wait(), 1)
    owner.flushed.clear()
    owner.pacer.schedule()  # right after a send
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(owner.flushes) == 1  # held back, though the loop turned
    await asyncio.wait_for(owner.flushed.wait(), 1)
    assert len(owner.flushes) == 2
    assert owner.flushes[1] - owner.flushes[0] >= 0.05 - 0.002  # the loop's clock ticks in ms
