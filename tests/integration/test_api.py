"""Every command and query of ``businessworker.api``, through the probe app, across 2 gateways."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from businessworker.testing import TIMEOUT
from tests.cluster import Cluster

FENCE = "fence: nothing after this"


class Probe:
    """A client of the probe app: ``call`` runs one API function in a worker."""

    _ids = itertools.count(1)
    opened: list[Probe] = []
    """every probe of this process, closed or not (see ``others_closed``)"""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.id: int = hello["hello"]
        self.inbox: list[Any] = []
        self.loop = asyncio.get_running_loop()
        Probe.opened.append(self)

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Probe:
        ws = await connect(url, compression=None, max_queue=None, **kwargs)
        return cls(ws, json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))

    @classmethod
    def others_closed(cls, *mine: Probe) -> None:
        """Every probe but ``mine`` has closed: a fence for counting every client of a
        shared cluster. A WebSocket close ends when the gateway closes the TCP
        connection, which it does after taking the client out of its table (it runs
        connection_lost before closing the socket), so a closed probe is no longer
        counted by any gateway."""
        left = [p.id for p in cls.opened if p not in mine and p.ws.state is not State.CLOSED]
        assert not left, f"probes of earlier tests still open: {left}"

    async def _recv(self) -> Any:
        raw = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        if isinstance(raw, bytes):
            return raw
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    async def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        req = next(self._ids)
        await self.ws.send(json.dumps({"op": op, "args": args, "kwargs": kwargs, "id": req}))
        while True:
            message = await self._recv()
            if isinstance(message, dict) and message.get("reply") == req:
                return message["result"]
            self.inbox.append(message)

    async def push(self) -> Any:
        """The next message that is not a reply."""
        if self.inbox:
            return self.inbox.pop(0)
        return await self._recv()

    async def nothing(self, after: Probe) -> None:
        """Nothing more comes from what ``after`` did: a marker sent by ``after``'s worker
        (which sent the commands before it, in order) arrives with nothing before it."""
        assert not self.inbox, self.inbox
        await after.call("send_to_client", self.id, FENCE)
        extra = await self.push()
        assert extra == FENCE, f"unexpected {extra!r}"

    async def close(self) -> None:
        await self.ws.close()


@pytest.fixture(autouse=True)
async def no_probe_outlives_its_test() -> AsyncIterator[None]:
    """A test that failed half-way leaves no client to later tests' counts."""
    yield
    loop = asyncio.get_running_loop()
    for probe in Probe.opened:
        if probe.loop is loop and probe.ws.state is not State.CLOSED:
            await probe.close()


async def trio(cluster: Cluster) -> tuple[Probe, Probe, Probe]:
    """Three probes: a and c on gateway 0, b on gateway 1."""
    a = await Probe.open(cluster.ws_url(0))
    b = await Probe.open(cluster.ws_url(1))
    c = await Probe.open(cluster.ws_url(0))
    return a, b, c


async def close_all(*probes: Probe) -> None:
    for probe in probes:
        await probe.close()


async def test_handshake_details_reach_on_websocket_connect(probe_cluster: Cluster) -> None:
    url = probe_cluster.ws_url(1) + "room/7?token=abc&x=1"
    probe = await Probe.open(url, additional_headers={"X-Probe": "yes"})
    assert probe.hello["path"] == "/room/7"
    assert probe.hello["query"] == {"token": ["abc"], "x": ["1"]}
    assert probe.hello["agent"] == "yes"
    assert probe.hello["peer"].startswith("127.0.0.1:")
    me = await probe.call("whoami")
    assert me["client_id"] == probe.id
    assert "connected_pid" in me["session"]  # written by on_connect, seen by on_message
    await probe.close()


async def test_on_websocket_connect_can_refuse(probe_cluster: Cluster) -> None:
    async with connect(probe_cluster.ws_url(0) + "refuse") as ws:
        try:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1008
        else:
            raise AssertionError("a refused client was not closed")


async def test_send_to_client_and_clients_across_gateways(probe_cluster: Cluster) -> None:
    a, b, c = await trio(probe_cluster)
    await a.call("send_to_client", b.id, "plain text")
    assert await b.push() == "plain text"
    await b.call("send_to_clients", [a.id, c.id], {"to": "both"})
    assert await a.push() == {"to": "both"}
    assert await c.push() == {"to": "both"}
    await b.nothing(after=b)
    await close_all(a, b, c)


async def test_send_to_all_with_exclusions(probe_cluster: Cluster) -> None:
    a, b, c = await trio(probe_cluster)
    await b.call("send_to_all", "everyone", exclude=[a.id])
    assert await b.push() == "everyone"
    assert await c.push() == "everyone"
    await a.nothing(after=b)
    await close_all(a, b, c)


async def test_groups(probe_cluster: Cluster) -> None:
    a, b, c = await trio(probe_cluster)
    for probe in (a, b, c):
        assert await a.call("join_group", probe.id, "g1") is True
    assert await a.call("join_group", 123456789, "g1") is False  # no such client
    assert await b.call("get_client_ids_by_group", "g1") == sorted([a.id, b.id, c.id])
    assert await b.call("get_client_count_by_group", "g1") == 3
    assert "g1" in await c.call("get_all_group_ids")
    await c.call("send_to_group", "g1", "hello g1", exclude=[b.id])
    assert await a.push() == "hello g1"
    assert await c.push() == "hello g1"
    await b.nothing(after=c)

    await a.call("join_group", a.id, "g2")
    await a.call("send_to_group", ["g1", "g2"], "once")  # a is in both: gets it once
    assert [await p.push() for p in (a, b, c)] == ["once"] * 3
    await a.nothing(after=a)

    await b.call("leave_group", b.id, "g1")
    assert await a.call("get_client_ids_by_group", "g1") == sorted([a.id, c.id])
    await a.call("ungroup", "g1")
    assert await a.call("get_client_count_by_group", "g1") == 0
    assert "g1" not in await a.call("get_all_group_ids")
    await a.call("ungroup", "g2")
    await close_all(a, b, c)


async def test_uids(probe_cluster: Cluster) -> None:
    a, b, c = await trio(probe_cluster)
    await a.call("bind_uid", a.id, "alice")
    await a.call("bind_uid", b.id, "alice")  # one user, two connections on two gateways
    await a.call("bind_uid", c.id, 42)  # ints become strings
    assert await c.call("get_uid_by_client_id", b.id) == "alice"
    assert await c.call("get_client_ids_by_uid", "alice") == sorted([a.id, b.id])
    assert await c.call("is_uid_online", "alice") is True
    assert await c.call("is_uid_online", "bob") is False
    await c.call("send_to_uid", "alice", "for alice")
    assert await a.push() == "for alice"
    assert await b.push() == "for alice"
    await c.nothing(after=c)
    await c.call("join_group", a.id, "u")
    await c.call("join_group", c.id, "u")
    assert await c.call("get_uids_by_group", "u") == ["42", "alice"]
    await a.call("unbind_uid", a.id, "alice")
    assert await a.call("get_client_ids_by_uid", "alice") == [b.id]
    assert await a.call("get_uid_by_client_id", a.id) is None
    await a.call("ungroup", "u")
    await close_all(a, b, c)


async def test_sessions_from_any_worker(probe_cluster: Cluster) -> None:
    a, b, c = await trio(probe_cluster)
    await b.call("set_session", a.id, {"name": "A", "n": 1})
    assert await c.call("get_session", a.id) == {"name": "A", "n": 1}
    await b.call("update_session", a.id, {"n": 2, "extra": [1, 2]})
    assert await c.call("get_session", a.id) == {"name": "A", "n": 2, "extra": [1, 2]}
    me = await a.call("whoami")  # the session handed to a's own callback
    assert me["session"] == {"name": "A", "n": 2, "extra": [1, 2]}

    await a.call("join_group", a.id, "s")
    await a.call("join_group", b.id, "s")
    sessions = await c.call("get_client_sessions_by_group", "s")
    assert sessions[str(a.id)]["name"] == "A"
    assert set(sessions) == {str(a.id), str(b.id)}
    Probe.others_closed(a, b, c)  # so the cluster's clients are exactly ours
    everything = await c.call("get_all_client_sessions")
    assert set(everything) == {str(a.id), str(b.id), str(c.id)}
    assert await c.call("get_all_client_count") == 3
    assert await c.call("get_session", 987654321) is None
    await a.call("ungroup", "s")
    await close_all(a, b, c)


async def test_session_changes_are_seen_by_the_next_event(probe_cluster: Cluster) -> None:
    """Change in one callback, read in the very next one (no race with the write-back)."""
    probe = await Probe.open(probe_cluster.ws_url(0))
    for i in range(50):
        reqs = [
            {"op": "session", "kwargs": {"n": i}, "id": -1},
            {"op": "whoami", "id": -2},
        ]
        for req in reqs:
            await probe.ws.send(json.dumps(req))
        await probe.push()
        me = await probe.push()
        assert me["result"]["session"]["n"] == i
    await probe.close()


async def test_close_client_with_a_last_message(probe_cluster: Cluster) -> None:
    a, b, c = await trio(probe_cluster)
    await a.call("close_client", b.id, "bye now")
    assert await b.push() == "bye now"
    try:
        await asyncio.wait_for(b.ws.recv(), TIMEOUT)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1000
    else:
        raise AssertionError("not closed")
    assert await a.call("is_online", b.id) is False
    await close_all(a, c)


async def test_unknown_client_ids_are_harmless(probe_cluster: Cluster) -> None:
    probe = await Probe.open(probe_cluster.ws_url(0))
    ghost = 1 << 50  # a prefix no gateway owns
    assert await probe.call("is_online", ghost) is False
    assert await probe.call("is_online", probe.id) is True
    for op in ("send_to_client", "close_client"):
        await probe.call(op, ghost, "x")
    await probe.call("send_to_clients", [ghost, probe.id + 1], "x")
    await probe.call("bind_uid", ghost, "nobody")
    assert await probe.call("get_session", ghost) is None
    assert await probe.call("whoami")  # still served
    await probe.close()


async def test_a_failing_callback_touches_nothing_else(probe_cluster: Cluster) -> None:
    a, b, c = await trio(probe_cluster)
    for _ in range(5):
        await a.ws.send(json.dumps({"op": "raise"}))
    # The worker survived and still serves both clients, in order:
    assert (await a.call("whoami"))["client_id"] == a.id
    assert (await b.call("whoami"))["client_id"] == b.id
    logs = probe_cluster.logs()
    assert f"callback failed client={a.id} event=message" in logs
    assert "probe: callback failure on purpose" in logs
    assert all(p.poll() is None for p in probe_cluster.workers if p is not None)
    await close_all(a, b, c)


async def test_events_of_one_client_are_handled_in_order(probe_cluster: Cluster) -> None:
    """Async callbacks that yield a random number of times still run one after another."""
    probe = await Probe.open(probe_cluster.ws_url(1))
    n = 300
    for i in range(n):
        request = {"op": "echo", "args": [i], "yields": random.randint(0, 5)}
        await probe.ws.send(json.dumps(request))
    got = [(await probe.push())["echo"] for _ in range(n)]
    assert got == list(range(n))
    await probe.close()


async def test_binary_frames(probe_cluster: Cluster) -> None:
    probe = await Probe.open(probe_cluster.ws_url(0))
    await probe.ws.send(b"\x00\x01\xff")
    assert await probe.push() == b"\x00\x01\xff"
    await probe.close()
