"""Presence with a grace period: a member that comes back in time carries on.

Real processes and sockets; the chat's grace is 2 s here (CHAT_GRACE). Members
log in with "resume" and come back with the token their user_list gave them.
What must not arrive (a logout, a login) is shown absent by a marker said
after it: every observer reads up to the marker.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chat import ChatClient
from tests.cluster import Cluster

GRACE = 2.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(gateways=3, workers=2, env={"CHAT_GRACE": str(GRACE)}) as cluster:
        yield cluster


async def member(url: str, name: str, room: str, resume: Any = True) -> ChatClient:
    client = await ChatClient.open(url)
    await client.login(name, room=room, resume=resume)
    return client


async def read_to(client: ChatClient, marker: str) -> list[dict[str, Any]]:
    """Everything ``client`` gets up to and including the say ``marker``."""
    seen = []
    while True:
        message = await client.recv()
        seen.append(message)
        if message["type"] == "say" and message["content"] == marker:
            return seen


def resume_of(client: ChatClient) -> dict[str, Any]:
    """What ``client`` would send to carry on: its token and the last position it read."""
    last = next((m for m in reversed(client.received) if "offset" in m), client.user_list)
    return {"token": client.user_list["token"], "epoch": last["epoch"], "offset": last["offset"]}


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages if m["type"] in ("login", "logout")]


def roster(client: ChatClient) -> list[tuple[int, str]]:
    return sorted((u["uid"], u["name"]) for u in client.user_list["user_list"])


def test_back_within_grace_nobody_sees_leave_or_join(cluster: Cluster) -> None:
    async def scenario() -> None:
        room = "grace-back"
        watcher = await member(cluster.ws_url(1), "watcher", room)
        alice = await member(cluster.ws_url(0), "alice", room)
        await watcher.expect("login")
        uid, resume = alice.uid, resume_of(alice)
        alice.ws.transport.abort()
        await watcher.say("while away")
        await read_to(watcher, "while away")  # sequenced before the resume
        again = await ChatClient.open(cluster.ws_url(2))
        await again.login("alice", room=room, resume=resume)
        back = again.user_list
        assert back["resumed"] is True and back["uid"] == uid, back
        assert back["recovered"] is True and back["missed"] == 1, (back, resume)
        assert roster(again) == sorted([(uid, "alice"), (watcher.uid, "watcher")])
        await again.say("back")
        seen = await read_to(watcher, "back")
        assert kinds(seen) == [], seen
        assert [m["from_uid"] for m in seen if m["type"] == "say"][-1] == uid
        replay = await read_to(again, "back")
        assert [m.get("content") for m in replay if m["type"] == "say"] == ["while away", "back"]
        # Private messages find the member by its uid on its new connection.
        await watcher.say("psst", to=uid)
        await watcher.say("marker")
        got = await read_to(again, "marker")
        assert [m["content"] for m in got if m["type"] == "say"] == ["psst", "marker"]
        for client in (watcher, again):
            await client.close()

    asyncio.run(scenario())


def test_not_back_leaves_once_after_grace(cluster: Cluster) -> None:
    async def scenario() -> None:
        room = "grace-gone"
        watcher = await member(cluster.ws_url(1), "watcher", room)
        bob = await member(cluster.ws_url(0), "bob", room)
        await watcher.expect("login")
        bob.ws.transport.abort()
        logout = await watcher.recv(timeout=GRACE + 10)
        assert logout["type"] == "logout" and logout["uid"] == bob.uid, logout
        late = await ChatClient.open(cluster.ws_url(2))
        await late.login("bob", room=room, resume={"token": bob.user_list["token"]})
        assert late.user_list["resumed"] is False
        assert late.uid != bob.uid
        await late.say("marker")
        seen = await read_to(watcher, "marker")
        assert kinds(seen) == ["login"], seen  # a new member, and no second logout
        for client in (watcher, late):
            await client.close()

    asyncio.run(scenario())


def test_gateway_killed_members_carry_on(cluster: Cluster) -> None:
    """Every member of the killed gateway resumes elsewhere; one does not come back
    and leaves once, after the grace; every roster is exact."""

    async def scenario() -> None:
        room = "grace-kill"
        stay = [await member(cluster.ws_url(1), f"stay{i}", room) for i in range(3)]
        moving = [await member(cluster.ws_url(0), f"move{i}", room) for i in range(4)]
        for client in stay:
            await read_logins(client, len(moving) + len(stay) - 1 - stay.index(client))
        cluster.kill_gateway(0)
        read = [len(client.received) for client in stay]
        await stay[0].say("while dead")
        comeback = []
        for client in moving[:3]:
            again = await ChatClient.open(cluster.ws_url(2))
            await again.login("someone", room=room, resume=resume_of(client))
            assert again.user_list["resumed"] is True, again.user_list
            assert again.uid == client.uid
            comeback.append(again)
        gone = moving[3]
        while (logout := await stay[1].recv(timeout=GRACE + 15))["type"] != "logout":
            pass
        assert logout["uid"] == gone.uid, logout
        await stay[0].say("marker")
        for client, start in zip(stay, read, strict=True):
            seen = [m for m in client.received[start:] if m["type"] in ("login", "logout")]
            seen += await read_to(client, "marker")
            logouts = [m["uid"] for m in seen if m["type"] == "logout"]
            assert kinds(seen).count("login") == 0 and logouts == [gone.uid], seen
        everyone = {c.uid for c in stay + comeback}
        check = await member(cluster.ws_url(1), "check", room)
        assert {u["uid"] for u in check.user_list["user_list"]} == everyone | {check.uid}
        for client in stay + comeback + [check]:
            await client.close()
        cluster.start_gateway(0)

    asyncio.run(scenario())


async def read_logins(client: ChatClient, n: int) -> None:
    for _ in range(n):
        await client.expect("login")


def test_drained_gateway_members_carry_on(cluster: Cluster) -> None:
    """A drain (1012) closes the members on gateway 1; they resume on gateway 2."""

    async def scenario() -> None:
        room = "grace-drain"
        watcher = await member(cluster.ws_url(2), "watcher", room)
        moving = [await member(cluster.ws_url(1), f"drained{i}", room) for i in range(3)]
        await read_logins(watcher, len(moving))
        read = len(watcher.received)
        cluster.stop_gateway(1)
        for client in moving:
            assert (await client.closed())[0] == 1012
        comeback = []
        for client in moving:
            again = await ChatClient.open(cluster.ws_url(2))
            await again.login("someone", room=room, resume=resume_of(client))
            assert again.user_list["resumed"] is True and again.uid == client.uid
            comeback.append(again)
        await watcher.say("marker")
        seen = watcher.received[read:] + await read_to(watcher, "marker")
        assert kinds(seen) == [], seen
        assert roster(comeback[0]) == sorted(
            [(watcher.uid, "watcher")] + [(c.uid, f"drained{i}") for i, c in enumerate(moving)]
        )
        for client in [watcher, *comeback]:
            await client.close()
        cluster.start_gateway(1)

    asyncio.run(scenario())


def test_worker_killed_during_grace(cluster: Cluster) -> None:
    """Members away while a worker dies: one comes back and carries on, the other
    leaves once after the grace (its close event goes to the worker that took over)."""

    async def scenario() -> None:
        room = "grace-worker"
        watcher = await member(cluster.ws_url(1), "watcher", room)
        back = await member(cluster.ws_url(0), "back", room)
        gone = await member(cluster.ws_url(0), "gone", room)
        await read_logins(watcher, 2)
        read = len(watcher.received)
        back.ws.transport.abort()
        gone.ws.transport.abort()
        cluster.kill_worker(0)
        again = await ChatClient.open(cluster.ws_url(2))
        await again.login("back", room=room, resume=resume_of(back))
        assert again.user_list["resumed"] is True and again.uid == back.uid
        while (logout := await watcher.recv(timeout=GRACE + 15))["type"] != "logout":
            pass
        assert logout["uid"] == gone.uid, logout
        await watcher.say("marker")
        seen = watcher.received[read:] + await read_to(watcher, "marker")
        assert [(m["type"], m["uid"]) for m in seen if m["type"] in ("login", "logout")] == [
            ("logout", gone.uid)
        ], seen
        for client in (watcher, again):
            await client.close()
        cluster.start_worker(0)

    asyncio.run(scenario())


def test_gateway_paused_members_carry_on() -> None:
    """A gateway paused (SIGSTOP) past the link timeout: its workers park its members
    on the other gateway; when it wakes up it closes them with 1012 and they resume
    there, with what was said meanwhile. Nobody sees a leave or a join, and the
    roster is exact. Its own cluster: the pause disturbs every link of it."""

    async def scenario(cluster: Cluster) -> None:
        room = "grace-pause"
        stay = await member(cluster.ws_url(1), "stay", room)
        moving = [await member(cluster.ws_url(0), f"paused{i}", room) for i in range(3)]
        await read_logins(stay, len(moving))
        read = len(stay.received)
        gone = f"gateway gone, closing its clients gateway={cluster.gateway_id(0)}"
        pid = cluster.gateways[0].pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGSTOP)
        try:
            for worker in ("worker0", "worker1"):  # each parked what it served
                await asyncio.to_thread(cluster.wait_log, worker, gone)
            await stay.say("while paused")
        finally:
            os.kill(pid, signal.SIGCONT)
        comeback = []
        for client in moving:
            assert (await client.closed())[0] == 1012
            again = await ChatClient.open(cluster.ws_url(1))
            await again.login("someone", room=room, resume=resume_of(client))
            back = again.user_list
            assert back["resumed"] is True and again.uid == client.uid, back
            assert back["recovered"] is True, back
            comeback.append(again)
        await stay.say("marker")
        for again in comeback:
            said = [m["content"] for m in await read_to(again, "marker") if m["type"] == "say"]
            assert said[0] == "while paused" and said[-1] == "marker", said
        seen = stay.received[read:] + await read_to(stay, "marker")
        assert kinds(seen) == [], seen
        check = await member(cluster.ws_url(0), "check", room)  # the woken gateway, anew
        everyone = {stay.uid, check.uid} | {c.uid for c in comeback}
        assert {u["uid"] for u in check.user_list["user_list"]} == everyone
        for client in [stay, *comeback, check]:
            await client.close()

    env = {"CHAT_GRACE": "10"}  # longer than the link timeout the pause has to outlast
    with Cluster(gateways=2, workers=2, env=env) as cluster:
        asyncio.run(scenario(cluster))
