"""Chat rooms and bounded chat traffic for the fault tests: who said what, who heard what."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from businessworker.testing import TIMEOUT
from tests.chat import ChatClient

PREFIX_SHIFT = 22
"""A client id is ``gateway prefix << 22 | counter`` (README, design notes)."""


def prefix_of(uid: int) -> int:
    return uid >> PREFIX_SHIFT


def gateway_of(uid: int, status: dict[str, Any]) -> dict[str, Any]:
    """The register's entry of the gateway that holds client ``uid``."""
    for g in status["gateways"]:
        if prefix_of(uid) in g["prefixes"]:
            return g
    raise LookupError(f"no gateway with prefix {prefix_of(uid)} in {status}")


async def open_clients(url: str, n: int, batch: int = 25) -> list[ChatClient]:
    clients: list[ChatClient] = []
    while len(clients) < n:
        count = min(batch, n - len(clients))
        clients += await asyncio.gather(*(ChatClient.open(url) for _ in range(count)))
    return clients


async def login_room(clients: list[ChatClient], room: str) -> None:
    """Log everyone in, one after the other; earlier members read each newcomer's login."""
    for i, client in enumerate(clients):
        users = await client.login(f"{room}-{i}", room=room)
        assert len(users) == i + 1, users  # the room's users, on every gateway
        for earlier in clients[:i]:
            assert (await earlier.expect("login"))["uid"] == client.uid


@dataclass
class Traffic:
    """Rooms of logged-in clients saying numbered lines; listeners record every say heard.

    Line ``i`` goes to room ``i % len(rooms)`` and is said by the members in turn. A client
    that is closed, or hears anything but a say, is recorded in ``errors``.
    """

    rooms: list[list[ChatClient]]
    said: list[list[tuple[int, str]]] = field(default_factory=list)
    heard: dict[int, list[str]] = field(default_factory=dict)
    fenced: dict[int, set[str]] = field(default_factory=dict)
    """markers heard by each client (``settle``), apart from the lines"""
    errors: list[str] = field(default_factory=list)
    _listeners: list[asyncio.Task[None]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _fences: int = 0

    def __post_init__(self) -> None:
        self.said = [[] for _ in self.rooms]
        for room in self.rooms:
            for client in room:
                self.heard[id(client)] = []
                self.fenced[id(client)] = set()
                self._listeners.append(asyncio.create_task(self._listen(client)))

    async def _listen(self, client: ChatClient) -> None:
        try:
            while True:
                message = await client.recv(timeout=3600)  # until settle() ends it
                if message["type"] != "say":
                    self.errors.append(f"{client.uid} got {message}")
                elif message["content"].startswith("fence "):
                    self.fenced[id(client)].add(message["content"])
                else:
                    self.heard[id(client)].append(message["content"])
                self._arrived.set()
        except ConnectionClosed as exc:
            self.errors.append(f"{client.uid} closed: {exc}")
            self._arrived.set()

    async def run(
        self,
        fault: Callable[[], object] | None = None,
        *,
        at: int = 50,
        after: int = 50,
        pace: float = 0.01,
        max_lines: int = 3000,
        max_time: float = 60,
    ) -> float:
        """Say lines until ``fault()`` (run in a thread from line ``at``) has returned and
        ``after`` more lines went out; bounded by ``max_lines`` and ``max_time``.
        Returns how long the fault took."""
        start = time.monotonic()
        job: asyncio.Future[object] | None = None
        took = 0.0
        remaining = after
        i = 0
        while i < max_lines and time.monotonic() - start < max_time:
            r = i % len(self.rooms)
            room = self.rooms[r]
            sender = (i // len(self.rooms)) % len(room)
            content = f"r{r} s{sender} n{i}"
            await room[sender].say(content)
            self.said[r].append((sender, content))
            i += 1
            if fault is not None and job is None and i >= at:
                fault_start = time.monotonic()
                job = asyncio.ensure_future(asyncio.to_thread(fault))
            if job is not None and job.done():
                if not took:
                    job.result()  # raise the fault's own failure here
                    took = time.monotonic() - fault_start
                remaining -= 1
                if remaining <= 0:
                    break
            elif fault is None and i >= at + after:
                break
            await asyncio.sleep(pace)
        else:
            raise AssertionError(
                f"traffic bound reached: {i} lines, fault done={job and job.done()}"
            )
        return took

    async def settle(self, timeout: float = TIMEOUT) -> None:
        """Every sender says a marker; wait until every listener heard every marker of its
        room; stop listening. One client's says are handled and delivered in order, so
        whatever was coming of the lines said before (a repeat too) came before its
        marker: no time window. A missing line shows in ``missing()``."""
        self._fences += 1
        markers = [
            {f"fence {self._fences} r{r} s{s}" for s in range(len(room))}
            for r, room in enumerate(self.rooms)
        ]
        for r, room in enumerate(self.rooms):
            for s, client in enumerate(room):
                await client.say(f"fence {self._fences} r{r} s{s}")

        def unfenced() -> list[str]:
            return [
                f"client {c.uid} (room {r})"
                for r, room in enumerate(self.rooms)
                for c in room
                if not markers[r] <= self.fenced[id(c)]
            ]

        try:
            async with asyncio.timeout(timeout):
                while unfenced() and not self.errors:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            late = unfenced()
            raise AssertionError(
                f"{len(late)} clients did not hear every marker within {timeout:g} s: "
                f"{late[:5]}; missing {self.missing()[:5]}"
            ) from None
        finally:
            for task in self._listeners:
                task.cancel()
            await asyncio.gather(*self._listeners, return_exceptions=True)

    def lines(self) -> int:
        return sum(len(s) for s in self.said)

    def missing(self) -> list[str]:
        out = []
        for r, room in enumerate(self.rooms):
            want = {content for _, content in self.said[r]}
            for c in room:
                lost = want - set(self.heard[id(c)])
                if lost:
                    out.append(f"client {c.uid} (room {r}) missed {len(lost)}: {sorted(lost)[:5]}")
        return out

    def repeated(self) -> int:
        return sum(len(h) - len(set(h)) for h in self.heard.values())

    def out_of_order(self) -> list[str]:
        """Lines of one sender heard in another order than said."""
        out = []
        for r, room in enumerate(self.rooms):
            for sender in range(len(room)):
                order = [content for s, content in self.said[r] if s == sender]
                wanted = set(order)
                for c in room:
                    got = [x for x in dict.fromkeys(self.heard[id(c)]) if x in wanted]
                    if got != order:
                        out.append(f"client {c.uid} heard sender {sender} of room {r} reordered")
        return out
