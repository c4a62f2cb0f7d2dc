"""A room under chat load for the fault tests, counted at every receiver.

Members log in to one room; a few of them (senders) say numbered lines at a
steady pace while a fault happens. Every member records each line it hears,
with when, and every logout. A member closed with 1012 or cut off reconnects
and logs in again under its name, as the page does. A round ends with a marker
from each sender: once every connected member heard every marker, whatever the
senders said was either delivered or will never be, and the counts are final.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from tests.chat import ChatClient

ROOM = "load"
END = -1


@dataclass
class Member:
    name: str
    url: str
    client: ChatClient | None = None
    uid: int = 0
    heard: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """sender -> (line number, when heard) in the order heard, this round"""
    logouts: Counter[int] = field(default_factory=Counter)
    closes: list[int | None] = field(default_factory=list)
    """close codes this round (each one followed by a reconnect)"""
    errors: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    rejoining: bool = False
    """closed, and not logged in again yet"""
    attempts: list[str] = field(default_factory=list)
    """why each try to log in again failed, and what it had received"""

    async def join(self) -> None:
        self.client = await ChatClient.open(self.url)
        await self.client.login(self.name, room=ROOM)
        assert self.client.uid is not None
        self.uid = self.client.uid

    async def listen(self) -> None:
        while True:
            try:
                assert self.client is not None
                message = await self.client.recv(timeout=3600)
            except ConnectionClosed as exc:
                self.closes.append(exc.rcvd.code if exc.rcvd else None)
                await self._rejoin()
                continue
            kind = message["type"]
            if kind == "say":
                sender, _, number = message["content"].partition(" ")
                self.heard.setdefault(sender, []).append((int(number), time.monotonic()))
            elif kind == "logout":
                self.logouts[message["uid"]] += 1
            elif kind != "login":
                self.errors.append(f"{self.name} got {message}")

    async def _rejoin(self) -> None:
        self.rejoining = True
        for attempt in range(60):
            try:
                await self.join()
                self.rejoining = False
                return
            except (OSError, ConnectionClosed, TimeoutError, AssertionError) as exc:
                seen = self.client.received[-3:] if self.client is not None else []
                self.attempts.append(f"{exc!r} after {seen}")
                await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
        raise AssertionError(f"{self.name} could not log in again")


@dataclass
class Round:
    """What one round measured."""

    lines: int
    lost: int
    duplicated: int
    out_of_order: int
    stall: float
    """the longest a line took to reach a member that stayed connected"""
    reconnected: int


class Room:
    """``size`` members of one room, ``senders`` of them saying lines ``pace`` apart."""

    def __init__(self, url: str | list[str], size: int, senders: int, pace: float = 0.04) -> None:
        urls = [url] if isinstance(url, str) else url
        self.url = urls[0]
        self.members = [Member(f"m{i}", urls[i % len(urls)]) for i in range(size)]
        self.senders: list[Member] = []
        self.count = senders
        self.pace = pace
        self.said: dict[str, dict[int, float]] = {}
        self._stop = asyncio.Event()
        self._saying: asyncio.Task[None] | None = None

    async def open(self) -> None:
        for first in range(0, len(self.members), 25):
            await asyncio.gather(*(m.join() for m in self.members[first : first + 25]))
        for member in self.members:
            member.task = asyncio.create_task(member.listen())

    def choose_senders(self, eligible: list[Member]) -> None:
        assert len(eligible) >= self.count, "too few members on the senders' gateway"
        self.senders = eligible[: self.count]

    async def close(self) -> None:
        tasks = [m.task for m in self.members if m.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        clients = [m.client for m in self.members if m.client is not None]
        await asyncio.gather(*(c.ws.close() for c in clients), return_exceptions=True)

    def start(self) -> None:
        """Begin a round: the senders say numbered lines until ``end``."""
        for member in self.members:
            member.heard.clear()
            member.closes.clear()
        self.said = {s.name: {} for s in self.senders}
        self._stop = asyncio.Event()
        self._saying = asyncio.create_task(self._say())

    async def _say(self, max_time: float = 120) -> None:
        start = time.monotonic()
        n = 0
        while not self._stop.is_set():
            assert time.monotonic() - start < max_time, "a round ran too long"
            for sender in self.senders:
                assert sender.client is not None
                self.said[sender.name][n] = time.monotonic()
                await sender.client.say(f"{sender.name} {n}")
            n += 1
            await asyncio.sleep(self.pace)

    async def end(self, timeout: float = 30) -> Round:
        """Stop saying, send the markers, wait until everyone heard them; the counts."""
        self._stop.set()
        assert self._saying is not None
        await self._saying
        # Whoever was closed logs in again before the markers go: a marker said while
        # a member was away is not one it can hear.
        deadline = time.monotonic() + timeout
        while any(m.rejoining for m in self.members):
            away = [m for m in self.members if m.rejoining]
            assert time.monotonic() < deadline, "not logged in again: " + ", ".join(
                f"{m.name} closes={m.closes} attempts={m.attempts[-3:]} "
                + f"now={m.client.received[-3:] if m.client else None}"
                for m in away[:5]
            )
            await asyncio.sleep(0.05)
        for sender in self.senders:
            assert sender.client is not None
            await sender.client.say(f"{sender.name} {END}")
        await self._until_every_marker_is_heard(deadline=time.monotonic() + timeout)
        return self._count()

    async def round(self, fault: Any, *, before: float = 1.0) -> Round:
        """A round with ``fault()`` run in a thread ``before`` s in; ends when it returned."""
        self.start()
        await asyncio.sleep(before)
        await asyncio.to_thread(fault)
        return await self.end()

    async def _until_every_marker_is_heard(self, deadline: float) -> None:
        def done(member: Member) -> bool:
            return all(
                any(number == END for number, _ in member.heard.get(s.name, ()))
                for s in self.senders
            )

        while not all(done(m) for m in self.members):
            late = [m for m in self.members if not done(m)]
            assert time.monotonic() < deadline, f"markers not heard by {len(late)}: " + ", ".join(
                f"{m.name} uid={m.uid} closes={m.closes} heard={sorted(m.heard)} "
                f"listening={m.task is not None and not m.task.done()}"
                + (f" failed={m.task.exception()!r}" if m.task and m.task.done() else "")
                for m in late[:5]
            )
            await asyncio.sleep(0.05)

    def _count(self) -> Round:
        lost = duplicated = disorder = 0
        stall = 0.0
        stayed = [m for m in self.members if not m.closes]
        for member in stayed:
            for sender, sent in self.said.items():
                got = [number for number, _ in member.heard.get(sender, ()) if number != END]
                lost += len(set(sent) - set(got))
                duplicated += len(got) - len(set(got))
                disorder += sum(1 for a, b in itertools.pairwise(got) if b < a)
                for number, when in member.heard.get(sender, ()):
                    if number != END:
                        stall = max(stall, when - sent[number])
        return Round(
            lines=sum(len(s) for s in self.said.values()),
            lost=lost,
            duplicated=duplicated,
            out_of_order=disorder,
            stall=round(stall, 2),
            reconnected=len(self.members) - len(stayed),
        )

    def errors(self) -> list[str]:
        return [e for m in self.members for e in m.errors]

    def logged_out_twice(self) -> list[int]:
        """uids some member heard logged out more than once."""
        return sorted({uid for m in self.members for uid, n in m.logouts.items() if n > 1})

    async def assert_rosters_true(self) -> None:
        """A newcomer's user_list is exactly the connected members (and itself)."""
        newcomer = await ChatClient.open(self.url)
        users = {u["uid"] for u in await newcomer.login("newcomer", room=ROOM)}
        want = {m.uid for m in self.members} | {newcomer.uid}
        assert users == want, (
            f"ghosts {sorted(users - want)[:5]}, missing {sorted(want - users)[:5]}"
        )
        await newcomer.ws.close()
