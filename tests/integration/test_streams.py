"""Room streams: one order for every member, and recovery across reconnects.

Real processes, real sockets. Members that log in with "resume" get every room
message with its position (epoch, offset); each test checks positions and
contents at every member: one order, and after a resume every message missed,
once, in order, or a plain "not recovered".
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from businessworker.chat import HISTORY
from businessworker.testing import TIMEOUT
from tests.chat import ChatClient
from tests.cluster import Cluster

ROOM = "streams"
END = "end"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(gateways=2, workers=4) as cluster:
        yield cluster


@dataclass
class Member:
    """A member that reads everything and knows the last position it saw."""

    name: str
    client: ChatClient | None = None
    seen: list[tuple[str, int, str]] = field(default_factory=list)
    """(epoch, offset, what) for every room message, in arrival order"""
    says: list[str] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    """the user_list of every resume: recovered, missed, epoch, offset"""
    recovery: list[float] = field(default_factory=list)
    """seconds from opening the new connection to the last missed message"""
    task: asyncio.Task[None] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    token: str | None = None
    """the member token of the last user_list (the chat keeps it through a disconnect)"""
    uid: int | None = None

    @property
    def last(self) -> dict[str, Any] | bool:
        if not self.seen:
            return True
        epoch, offset, _ = self.seen[-1]
        return {"epoch": epoch, "offset": offset, "token": self.token}

    async def join(self, url: str) -> None:
        start = time.monotonic()
        self.client = await ChatClient.open(url)
        resume = self.last
        await self.client.login(self.name, room=ROOM, resume=resume, keep_own=True)
        listing = self.client.user_list
        self.token = listing.get("token")
        if isinstance(resume, dict):
            self.resumes.append(listing)
            if listing.get("resumed"):  # no login of its own follows: read the replay here
                for _ in range(listing["missed"]):
                    self.record(await self.client.recv())
            self.recovery.append(time.monotonic() - start)
        if self.uid is None:
            self.uid = self.client.uid

    def record(self, message: dict[str, Any]) -> None:
        if "offset" not in message:
            return
        kind = message["type"]
        what = f"{kind} {message.get('content', message.get('name', ''))}"
        self.seen.append((message["epoch"], message["offset"], what))
        if kind == "say":
            self.says.append(message["content"])

    async def listen(self) -> None:
        """Read until the connection closes (then ``closed`` is set)."""
        assert self.client is not None
        try:
            while True:
                self.record(await self.client.recv(timeout=3600))
        except ConnectionClosed:
            self.closed.set()

    def start(self) -> None:
        self.closed = asyncio.Event()
        self.task = asyncio.create_task(self.listen())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()


def assert_continuous(member: Member) -> None:
    """Within each epoch, offsets follow one another: nothing missed, nothing twice."""
    previous: tuple[str, int] | None = None
    for epoch, offset, _ in member.seen:
        if previous is not None and previous[0] == epoch:
            assert offset == previous[1] + 1, (
                f"{member.name}: {previous} then {offset}",
                member.seen[-30:],
                member.resumes,
            )
        previous = (epoch, offset)


def assert_same_stream(members: list[Member]) -> None:
    """Every position means the same message at every member."""
    truth: dict[tuple[str, int], str] = {}
    for member in members:
        for epoch, offset, what in member.seen:
            assert truth.setdefault((epoch, offset), what) == what, (member.name, epoch, offset)


async def until_heard(members: list[Member], marker: str, timeout: float = TIMEOUT) -> None:
    """Until every member heard ``marker`` (their readers fill ``says``; each look is cheap)."""
    deadline = time.monotonic() + timeout
    while not all(marker in m.says for m in members):
        late = [m.name for m in members if marker not in m.says]
        assert time.monotonic() < deadline, f"{marker!r} not heard by {late}"
        await asyncio.sleep(0.02)


async def test_every_member_sees_one_order(cluster: Cluster) -> None:
    """4 senders on 2 gateways (so on several workers) saying as fast as they can; members
    on both gateways, opted in or not, see the says in the same order."""
    members = [Member(f"o{i}") for i in range(8)]
    plain = [await ChatClient.open(cluster.ws_url(i % 2)) for i in range(2)]
    for i, member in enumerate(members):
        await member.join(cluster.ws_url(i % 2))
    for i, client in enumerate(plain):
        await client.login(f"plain{i}", room=ROOM)
    for member in members:
        member.start()
    senders = members[:4]
    for n in range(150):
        await asyncio.gather(*(s.client.say(f"{s.name}-{n}") for s in senders))  # type: ignore[union-attr]
    markers = [f"{s.name}-{END}" for s in senders]
    for sender, marker in zip(senders, markers, strict=True):
        await sender.client.say(marker)  # type: ignore[union-attr]
    for marker in markers:
        await until_heard(members, marker)
    plain_says: list[list[str]] = []
    for client in plain:
        says: list[str] = []
        while not all(marker in says for marker in markers):
            message = await client.recv()
            if message["type"] == "say":
                assert "offset" not in message  # not opted in: the seed's shapes
                says.append(message["content"])
        plain_says.append(says)
    orders = [m.says for m in members] + plain_says
    expected = {f"{s.name}-{n}" for s in senders for n in range(150)} | set(markers)
    for order in orders:
        missing = sorted(expected - set(order))
        assert not missing, (
            len(missing),
            missing[:3],
            [len(o) for o in orders],
        )
        assert len(order) == 4 * 151
        assert order == orders[0]
    for member in members:
        assert_continuous(member)
    assert_same_stream(members)
    for member in members:
        await member.stop()
    for client in plain:
        await client.close()


async def test_a_resume_beyond_the_history_is_not_recovered(cluster: Cluster) -> None:
    away, sayer = Member("away"), Member("sayer")
    await away.join(cluster.ws_url(0))
    await sayer.join(cluster.ws_url(1))
    away.start()
    sayer.start()
    await sayer.client.say("before")  # type: ignore[union-attr]
    await until_heard([away], "before")
    await away.stop()
    for n in range(HISTORY + 10):
        await sayer.client.say(f"gone {n}")  # type: ignore[union-attr]
    await until_heard([sayer], f"gone {HISTORY + 9}")
    await away.join(cluster.ws_url(1))
    assert away.resumes[-1]["recovered"] is False
    assert away.resumes[-1]["missed"] == 0
    away.start()
    await sayer.client.say("after")  # type: ignore[union-attr]
    await until_heard([away], "after")
    assert not [s for s in away.says if s.startswith("gone")], "a partial replay"
    await away.stop()
    await sayer.stop()


async def test_a_resume_within_the_history_gets_exactly_what_was_missed(
    cluster: Cluster,
) -> None:
    away, sayer = Member("back"), Member("talker")
    await away.join(cluster.ws_url(0))
    await sayer.join(cluster.ws_url(1))
    away.start()
    sayer.start()
    await sayer.client.say("first")  # type: ignore[union-attr]
    await until_heard([away], "first")
    await away.stop()
    for n in range(20):
        await sayer.client.say(f"missed {n}")  # type: ignore[union-attr]
    await until_heard([sayer], "missed 19")
    await away.join(cluster.ws_url(1))  # the other gateway
    assert away.resumes[-1]["recovered"] is True
    away.start()
    await sayer.client.say("live")  # type: ignore[union-attr]
    await until_heard([away], "live")
    assert away.says == ["first", *[f"missed {n}" for n in range(20)], "live"]
    assert_continuous(away)
    assert_same_stream([away, sayer])
    await away.stop()
    await sayer.stop()


async def test_after_a_register_restart_a_resume_is_not_recovered(cluster: Cluster) -> None:
    away, sayer = Member("epoch"), Member("speaker")
    await away.join(cluster.ws_url(0))
    await sayer.join(cluster.ws_url(1))
    away.start()
    sayer.start()
    await sayer.client.say("old epoch")  # type: ignore[union-attr]
    await until_heard([away], "old epoch")
    await away.stop()
    cluster.stop_register()
    cluster.start_register()
    cluster.wait_ready()
    await sayer.client.say("new epoch")  # type: ignore[union-attr]
    await until_heard([sayer], "new epoch")
    await away.join(cluster.ws_url(0))
    assert away.resumes[-1]["recovered"] is False
    away.start()
    await sayer.client.say("and on")  # type: ignore[union-attr]
    await until_heard([away], "and on")
    assert "new epoch" not in away.says
    await away.stop()
    await sayer.stop()


async def test_twenty_gateway_deaths_lose_nothing_for_resuming_members() -> None:
    """Members on gateway 0 or 1 lose their gateway 20 times (SIGKILL, or a drain with
    1012 every fourth time, a worker SIGKILLed meanwhile every fifth) under a steady
    chat from gateway 2; each time they reconnect to the other one with what they last
    saw. Every one of them has every message of the room once, in the room's order."""
    with Cluster(gateways=3, workers=2) as cluster:
        victims = [Member(f"v{i}") for i in range(6)]
        watcher, sender = Member("watcher"), Member("sender")
        on = 0
        for member in victims:
            await member.join(cluster.ws_url(on))
        await watcher.join(cluster.ws_url(2))
        await sender.join(cluster.ws_url(2))
        for member in [*victims, watcher, sender]:
            member.start()
        stop = asyncio.Event()

        async def say() -> None:
            n = 0
            while not stop.is_set() and n < 5000:
                await sender.client.say(f"line {n}")  # type: ignore[union-attr]
                n += 1
                await asyncio.sleep(0.02)

        saying = asyncio.create_task(say())
        for cycle in range(20):
            drain = cycle % 4 == 3
            dying = cluster.gateway_id(on)
            if drain:
                stopping = asyncio.create_task(asyncio.to_thread(cluster.stop_gateway, on))
            else:
                cluster.kill_gateway(on)
            if cycle % 5 == 4:
                # While the members are away: once every worker has taken the gateway's
                # death in (a worker dying with it would take its members' records along).
                for w in range(2):
                    await asyncio.to_thread(
                        cluster.wait_log, f"worker{w}", f"closing its clients gateway={dying}"
                    )
                cluster.kill_worker(cycle % 2)
            await asyncio.wait_for(asyncio.gather(*(v.closed.wait() for v in victims)), 30)
            other = 1 - on
            await asyncio.gather(*(v.join(cluster.ws_url(other)) for v in victims))
            for member in victims:
                member.start()
            if drain:
                await stopping
            if cycle % 5 == 4:
                cluster.start_worker(cycle % 2, wait=False)
            await asyncio.to_thread(cluster.start_gateway, on)
            on = other
        stop.set()
        await saying
        await sender.client.say(END)  # type: ignore[union-attr]
        everyone = [*victims, watcher, sender]
        await until_heard(everyone, END)
        recovery = sorted(t for v in victims for t in v.recovery)
        print(
            f"{len(recovery)} resumes, recovery p50 {statistics.median(recovery) * 1000:.0f} ms "
            f"p99 {recovery[int(len(recovery) * 0.99) - 1] * 1000:.0f} ms, "
            f"{len(watcher.says)} says"
        )
        for member in victims:
            assert all(r["recovered"] for r in member.resumes), member.resumes
            odd = [
                (i, r["resumed"], r["uid"])
                for i, r in enumerate(member.resumes)
                if not r["resumed"] or r["uid"] != member.uid
            ]
            assert not odd, (member.name, member.uid, odd)
            assert len(member.resumes) == 20
            assert member.says == watcher.says, member.name
        # Presence: the watcher saw each victim log in once, and none of them leave.
        names = {f"login {v.name}" for v in victims} | {f"logout {v.name}" for v in victims}
        shown = [what for _, _, what in watcher.seen if what in names]
        assert not [w for w in shown if w.startswith("logout")], shown
        assert len(shown) == len(set(shown)), shown
        for member in everyone:
            assert_continuous(member)
        assert_same_stream(everyone)
        for member in everyone:
            await member.stop()


async def test_room_messages_reach_only_gateways_with_members() -> None:
    """Interest routing: with every member of a room on gateway 0 of 4, each room
    message leaves the register once, for gateway 0 (before: once for each of the 4).
    Counted by the register (status: streams.sends), once it knows every gateway's groups."""
    with Cluster(gateways=4, workers=2) as cluster:
        members = [Member(f"i{n}") for n in range(3)]
        for member in members:
            await member.join(cluster.ws_url(0))
            member.start()
        deadline = time.monotonic() + TIMEOUT
        while cluster.status()["streams"]["interest_known"] < 4:  # type: ignore[index]
            assert time.monotonic() < deadline, cluster.status()
            await asyncio.sleep(0.05)
        says = 50
        before = cluster.status()["streams"]["sends"]  # type: ignore[index]
        for n in range(says):
            await members[n % 3].client.say(f"line {n}")  # type: ignore[union-attr]
        await until_heard(members, f"line {says - 1}")
        after = cluster.status()["streams"]["sends"]  # type: ignore[index]
        print(f"stream messages per say, members on 1 of 4 gateways: {(after - before) / says}")
        assert after - before == says
        for member in members:  # one order, nothing lost on the way
            assert member.says == members[0].says
            assert sorted(member.says) == sorted(f"line {n}" for n in range(says))
            await member.stop()
