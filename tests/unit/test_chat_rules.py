"""The chat's rules, on businessworker.testing: the real cluster's code in this process.

Two gateways and two workers per test. What must not arrive is shown absent by
``settle()`` (everything caused has arrived) and an empty inbox, never by a
time window. tests/integration/test_chat.py keeps the seed's capture replayed
byte for byte against real processes, and the WebSocket layer's own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from businessworker import chat
from businessworker.testing import Harness, TestClient
from gateway import metrics


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with Harness("businessworker.chat", gateways=2, workers=2) as harness:
        yield harness


async def login(
    h: Harness, name: str, room: str | None = None, *, gateway: int = 0, **extra: Any
) -> TestClient:
    """A client that logged in: its user_list taken, its own login announced and taken."""
    client = await h.connect(gateway=gateway)
    request: dict[str, Any] = {"type": "login", "name": name, **extra}
    if room is not None:
        request["room"] = room
    await client.send(request)
    client.user_list = await client.expect("user_list")  # type: ignore[attr-defined]
    if not client.user_list.get("resumed"):  # type: ignore[attr-defined]
        own = await client.expect("login")
        assert own["name"] == name
        client.uid = own["uid"]  # type: ignore[attr-defined]
        client.last = own  # type: ignore[attr-defined]  # the last room message it read
    return client


async def room_of(h: Harness, n: int, room: str) -> list[TestClient]:
    """``n`` members of ``room`` over both gateways, everyone's login heard."""
    members = []
    for i in range(n):
        members.append(await login(h, f"{room}{i}", room, gateway=i % 2))
    await h.settle()
    for member in members:
        member.inbox.clear()
    return members


async def test_private_say_reaches_only_recipient_and_sender(h: Harness) -> None:
    a, b, c = await room_of(h, 3, "private")
    await a.send({"type": "say", "to_uid": b.uid, "content": "psst"})
    await h.settle()
    for client in (b, a):
        got = client.inbox.popleft()
        assert list(got) == ["type", "from_uid", "to_uid", "content", "time"]
        assert (got["from_uid"], got["to_uid"], got["content"]) == (a.uid, b.uid, "psst")
    # The uid may also come as a string, as pages built from <select> values send it.
    await b.send({"type": "say", "to_uid": str(a.uid), "content": "back"})
    await h.settle()
    assert a.inbox.popleft()["content"] == "back"
    assert b.inbox.popleft()["to_uid"] == a.uid
    assert not a.inbox and not b.inbox and not c.inbox


async def test_logout_goes_to_everyone_left(h: Harness) -> None:
    a, b, c = await room_of(h, 3, "logout")
    await b.close()
    await h.settle()
    for client in (a, c):
        got = client.inbox.popleft()
        assert list(got) == ["type", "uid", "name", "time"]
        assert (got["type"], got["uid"], got["name"]) == ("logout", b.uid, "logout1")
    await a.close()
    await h.settle()
    assert c.inbox.popleft()["uid"] == a.uid
    assert not c.inbox


async def test_rooms_scope_user_list_says_and_logouts(h: Harness) -> None:
    red = await login(h, "r", "red")
    blue = await login(h, "b", "blue", gateway=1)
    assert [u["name"] for u in blue.user_list["user_list"]] == ["b"]  # type: ignore[attr-defined]
    await red.send({"type": "say", "to_uid": "all", "content": "only red"})
    assert (await red.expect("say"))["content"] == "only red"
    await red.send({"type": "say", "to_uid": blue.uid, "content": "cross-room"})
    assert (await red.expect("error"))["code"] == "unknown_uid"
    await red.close()
    await h.settle()
    assert not blue.inbox
    assert h.groups(blue) == ["room:blue"]


async def test_every_say_reaches_every_member_on_both_gateways(h: Harness) -> None:
    members = await room_of(h, 6, "spread")
    for i, client in enumerate(members):
        await client.send({"type": "say", "to_uid": "all", "content": f"from {i}"})
    await h.settle()
    expected = {(m.uid, f"from {i}") for i, m in enumerate(members)}
    orders = [[(x["from_uid"], x["content"]) for x in m.inbox] for m in members]
    for order in orders:  # all of them, once, in one order (they were said at once)
        assert set(order) == expected and len(order) == 6 and order == orders[0]


async def test_one_order_for_every_member_when_all_say_at_once(h: Harness) -> None:
    """4 senders on 2 gateways and 2 workers, 30 says each sent without waiting."""
    members = await room_of(h, 6, "order")
    senders = members[:4]
    await asyncio.gather(
        *(
            s.send({"type": "say", "to_uid": "all", "content": f"{i}-{n}"})
            for n in range(30)
            for i, s in enumerate(senders)
        )
    )
    await h.settle()
    orders = [[x["content"] for x in m.inbox] for m in members]
    assert len(orders[0]) == 120
    assert all(order == orders[0] for order in orders)


BAD_INPUTS = [
    ("not json", "bad_json"),
    ('"just a string"', "not_object"),
    ("[1, 2]", "not_object"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": 7}', "bad_field"),
    ('{"no_type": true}', "bad_field"),
    ('{"type": "say", "to_uid": "all", "content": "x"}', "not_logged_in"),
    ('{"type": "login"}', "bad_field"),
    ('{"type": "login", "name": 5}', "bad_field"),
    ('{"type": "login", "name": ""}', "bad_name"),
    ('{"type": "login", "name": "   "}', "bad_name"),
    ('{"type": "login", "name": "%s"}' % ("n" * 33), "bad_name"),
    ('{"type": "login", "name": "ok", "room": 3}', "bad_field"),
    ('{"type": "login", "name": "ok", "resume": 3}', "bad_field"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_INPUTS)
async def test_bad_input_gets_an_error_and_the_connection_stays(
    h: Harness, frame: str, code: str
) -> None:
    client = await h.connect()
    await client.send(frame)
    error = await client.expect("error")
    assert list(error) == ["type", "code", "message"]
    assert error["code"] == code and error["message"]
    await client.send({"type": "login", "name": "survivor"})
    assert (await client.expect("user_list"))["user_list"][0]["name"] == "survivor"


async def test_bad_input_after_login(h: Harness) -> None:
    client = await login(h, "me", "after-login", gateway=1)
    cases = [
        ({"type": "login", "name": "again"}, "already_logged_in"),
        ({"type": "say", "to_uid": "all", "content": "x" * 4097}, "content_too_long"),
        ({"type": "say", "to_uid": "all", "content": 5}, "bad_field"),
        ({"type": "say", "to_uid": "all"}, "bad_field"),
        ({"type": "say", "content": "x"}, "bad_field"),
        ({"type": "say", "to_uid": True, "content": "x"}, "bad_field"),
        ({"type": "say", "to_uid": 12345, "content": "x"}, "unknown_uid"),
    ]
    for request, code in cases:
        await client.send(request)
        assert (await client.expect("error"))["code"] == code, request
    await client.send(b'{"type":"say"}')  # a binary frame is not a chat message
    assert (await client.expect("error"))["code"] == "bad_json"
    await client.send({"type": "say", "to_uid": "all", "content": "y" * 4096})
    assert len((await client.expect("say"))["content"]) == 4096


async def test_concurrent_logins_converge(h: Harness) -> None:
    """30 clients over 2 gateways and 2 workers log in at once; every roster ends true."""
    n = 30
    clients = [await h.connect(gateway=i % 2) for i in range(n)]
    await asyncio.gather(
        *(
            c.send({"type": "login", "name": f"c{i}", "room": "storm"})
            for i, c in enumerate(clients)
        )
    )
    await h.settle()
    rosters = []
    for client in clients:
        first = client.inbox.popleft()
        assert first["type"] == "user_list"
        roster = {u["uid"]: u["name"] for u in first["user_list"]}
        roster.update({m["uid"]: m["name"] for m in client.inbox if m["type"] == "login"})
        rosters.append(roster)
    assert sorted(rosters[0].values()) == sorted(f"c{i}" for i in range(n))
    assert all(roster == rosters[0] for roster in rosters)


async def test_a_member_back_within_the_grace_carries_on(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "GRACE", 30.0)
    watcher = await login(h, "watcher", "grace", gateway=1, resume=True)
    alice = await login(h, "alice", "grace", resume=True)
    await h.settle()
    watcher.inbox.clear()
    token, last = alice.user_list["token"], alice.last  # type: ignore[attr-defined]
    await alice.drop()
    await watcher.send({"type": "say", "to_uid": "all", "content": "while away"})
    await h.settle()
    figures = metrics.snapshot(h.gateways[0])  # type: ignore[arg-type]
    assert (figures["gateway_connections"], figures["gateway_members_away"]) == (0, 1)
    back = await login(
        h,
        "ignored",
        "grace",
        gateway=1,
        resume={"token": token, "epoch": last["epoch"], "offset": last["offset"]},
    )
    listing = back.user_list  # type: ignore[attr-defined]
    assert listing["resumed"] is True and listing["uid"] == alice.uid
    assert sorted(u["name"] for u in listing["user_list"]) == ["alice", "watcher"]
    await h.settle()
    assert [m.get("content") for m in back.inbox] == ["while away"], list(back.inbox)
    # its own say, and the roster repair: no logout, no login
    assert [m["type"] for m in watcher.inbox] == ["say", "back"]
    assert watcher.inbox[-1]["uid"] == alice.uid and watcher.inbox[-1]["name"] == "alice"
    assert h.session(back)["name"] == "alice"  # type: ignore[index]
    assert h.uid(back) == str(alice.uid)


async def test_a_member_not_back_leaves_once_after_the_grace(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "GRACE", 0.2)
    watcher = await login(h, "watcher", "gone", gateway=1, resume=True)
    bob = await login(h, "bob", "gone", resume=True)
    await h.settle()
    watcher.inbox.clear()
    await bob.drop()
    logout = await watcher.expect("logout")
    assert logout["uid"] == bob.uid
    await h.settle()
    assert not watcher.inbox  # once


async def test_members_of_a_killed_gateway_resume_on_the_other(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "GRACE", 30.0)
    stay = await login(h, "stay", "killed", gateway=1, resume=True)
    moving = [await login(h, f"m{i}", "killed", resume=True) for i in range(3)]
    await h.settle()
    stay.inbox.clear()
    tokens = [m.user_list["token"] for m in moving]  # type: ignore[attr-defined]
    await h.kill_gateway(0)
    for member, token in zip(moving, tokens, strict=True):
        again = await login(h, "x", "killed", gateway=1, resume={"token": token})
        assert again.user_list["resumed"] is True  # type: ignore[attr-defined]
        assert again.user_list["uid"] == member.uid  # type: ignore[attr-defined]
    await h.settle()
    # nobody left, nobody joined; each one back is told (and shows nothing)
    assert [m["type"] for m in stay.inbox] == ["back"] * 3
    assert len(h.members("room:killed")) == 4


async def test_back_goes_only_to_clients_that_asked_for_continuity(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "GRACE", 30.0)
    seed = await login(h, "seed", "mixed", gateway=1)  # the capture's client: no "resume"
    aware = await login(h, "aware", "mixed", gateway=1, resume=True)
    alice = await login(h, "alice", "mixed", resume=True)
    await h.settle()
    seed.inbox.clear()
    aware.inbox.clear()
    await alice.drop()
    again = await login(h, "x", "mixed", resume={"token": alice.user_list["token"]})  # type: ignore[attr-defined]
    assert again.user_list["resumed"] is True  # type: ignore[attr-defined]
    await h.settle()
    assert [m["type"] for m in aware.inbox] == ["back"]
    assert not seed.inbox  # the seed's shapes only, and nothing happened for it
    assert not again.inbox  # not told about itself


async def test_a_roster_read_before_a_member_was_parked_is_repaired_by_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The only gateway dies and a new one starts; the worker of one member parks its
    members there at once, the other's later. A member who resumes in between gets a
    user_list without the late one, and is told by "back" once it resumes."""
    monkeypatch.setattr(chat, "GRACE", 30.0)
    async with Harness("businessworker.chat", gateways=1, workers=2) as h:
        clients = [await login(h, f"c{i}", "parked", resume=True) for i in range(4)]
        await h.settle()
        gateway_id = h.gateways[0].id  # type: ignore[union-attr]
        by_worker: dict[int, TestClient] = {}
        for client in clients:
            for i, worker in enumerate(h.workers):
                if client.id in worker.dispatcher.served.get(gateway_id, {}):  # type: ignore[union-attr]
                    by_worker.setdefault(i, client)
        (_, early), (late_worker, late) = sorted(by_worker.items())
        parker = h.workers[late_worker].dispatcher.parker  # type: ignore[union-attr]
        release = asyncio.Event()
        park = parker._try

        def held(*args: Any) -> None:  # this worker learns of the new gateway late
            if release.is_set():
                park(*args)
            else:
                asyncio.get_running_loop().call_later(0.01, held, *args)

        monkeypatch.setattr(parker, "_try", held)
        await h.kill_gateway(0)
        new = await h.start_gateway()
        async with asyncio.timeout(10):
            while not h.online(early):  # parked by its worker
                await asyncio.sleep(0.01)
        first = await login(
            h, "x", "parked", gateway=new, resume={"token": early.user_list["token"]}
        )  # type: ignore[attr-defined]
        assert first.user_list["resumed"] is True  # type: ignore[attr-defined]
        listed = {u["uid"] for u in first.user_list["user_list"]}  # type: ignore[attr-defined]
        assert late.uid not in listed  # type: ignore[attr-defined]  # the race, made to happen
        release.set()
        async with asyncio.timeout(10):
            while not h.online(late):
                await asyncio.sleep(0.01)
        second = await login(
            h, "y", "parked", gateway=new, resume={"token": late.user_list["token"]}
        )  # type: ignore[attr-defined]
        assert second.user_list["resumed"] is True  # type: ignore[attr-defined]
        await h.settle()
        backs = [m for m in first.inbox if m.get("type") == "back"]
        assert [(m["uid"], m["name"]) for m in backs] == [(late.uid, f"c{clients.index(late)}")]  # type: ignore[attr-defined]
