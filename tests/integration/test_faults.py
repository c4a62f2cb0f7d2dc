"""Faults on a live cluster: dead workers, a restarted register, no workers, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

import pytest
from websockets.exceptions import ConnectionClosed

from businessworker.testing import TIMEOUT
from tests.chat import ChatClient
from tests.cluster import Cluster


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A fresh cluster per test; parametrize with a dict of Cluster arguments."""
    kwargs = getattr(request, "param", {})
    with Cluster(**kwargs) as c:
        yield c


async def room(cluster: Cluster, n: int, name: str) -> list[ChatClient]:
    clients = [await ChatClient.open(cluster.ws_url(i % cluster.n_gateways)) for i in range(n)]
    for i, client in enumerate(clients):
        await client.login(f"{name}{i}", room=name)
        for earlier in clients[:i]:
            await earlier.expect("login")
    return clients


async def chat_through(
    clients: list[ChatClient],
    count: int,
    faults: dict[int, Callable[[], object]],
    pace: float = 0.004,
) -> tuple[list[str], list[list[str]]]:
    """Clients take turns saying ``count`` numbered lines; ``faults[i]()`` runs after line
    ``i``. Returns, once every client heard every line, what was said and what each
    client received, in arrival order.
    """
    said = [f"line {i}" for i in range(count)]
    heard: list[list[str]] = [[] for _ in clients]

    async def listen(i: int) -> None:
        while len(set(heard[i])) < count:
            message = await clients[i].expect("say")
            heard[i].append(message["content"])

    listeners = [asyncio.create_task(listen(i)) for i in range(len(clients))]
    for i, line in enumerate(said):
        await clients[i % len(clients)].say(line)
        if i in faults:
            await asyncio.to_thread(faults[i])
        await asyncio.sleep(pace)
    await asyncio.wait_for(asyncio.gather(*listeners), TIMEOUT)
    return said, heard


def per_sender(lines: list[str], senders: int) -> list[list[str]]:
    """Lines grouped by who said them (line i came from client i % senders), in arrival order.

    Only each client's own events are ordered; two clients' lines handled by two
    workers may overtake each other.
    """
    groups: list[list[str]] = [[] for _ in range(senders)]
    for line in lines:
        groups[int(line.split()[1]) % senders].append(line)
    return groups


@pytest.mark.parametrize("cluster", [{"gateways": 2, "workers": 3}], indirect=True)
async def test_killing_a_worker_mid_traffic_loses_nothing(cluster: Cluster) -> None:
    clients = await room(cluster, 6, "kill")
    said, heard = await chat_through(clients, 300, {100: lambda: cluster.kill_worker(0)})
    for got in heard:
        # At least once: a line the dead worker handled but never acknowledged
        # is handled again by its successor.
        assert set(got) == set(said)
        first = list(dict.fromkeys(got))
        assert per_sender(first, len(clients)) == per_sender(said, len(clients))
    for client in clients:
        assert client.ws.state.name == "OPEN"
    # The next message is handled by a surviving worker, at once.
    start = time.monotonic()
    await clients[0].say("after")
    assert (await clients[1].expect("say"))["content"] == "after"
    assert time.monotonic() - start < 3.0
    dupes = sum(len(got) - len(set(got)) for got in heard)
    print(f"duplicates after SIGKILL: {dupes} of {len(said) * len(clients)} deliveries")


@pytest.mark.parametrize("cluster", [{"gateways": 2, "workers": 3}], indirect=True)
async def test_stopping_a_worker_loses_and_repeats_nothing(cluster: Cluster) -> None:
    """A clean stop (SIGTERM, as supervisor sends) drains: every line exactly once, in order."""
    clients = await room(cluster, 6, "stop")
    said, heard = await chat_through(clients, 300, {100: lambda: cluster.stop_worker(0)})
    for got in heard:
        assert sorted(got) == sorted(said)  # each line exactly once
        assert per_sender(got, len(clients)) == per_sender(said, len(clients))
    assert "worker draining" in cluster.logs()


async def test_restarting_the_register_loses_no_message(cluster: Cluster) -> None:
    """The register stops after line 50 (its process has exited) and starts again after
    line 150: lines 51-150 are said while it is down (room messages wait for it, README).
    Every line is heard by everyone, once, in each sender's order."""
    clients = await room(cluster, 4, "reg")
    faults = {50: cluster.stop_register, 150: cluster.start_register}
    said, heard = await chat_through(clients, 200, faults)
    for got in heard:
        assert sorted(got) == sorted(said)
        assert per_sender(got, len(clients)) == per_sender(said, len(clients))
    # Gateways and workers registered again by themselves; a new worker joins.
    cluster.wait_ready()
    cluster.n_workers += 1
    cluster.workers.append(None)
    cluster.start_worker(len(cluster.workers) - 1)
    await clients[0].say("still here")
    for client in clients:
        assert (await client.expect("say"))["content"] == "still here"


@pytest.mark.parametrize("cluster", [{"gateways": 1, "workers": 0}], indirect=True)
async def test_without_workers_clients_wait_and_are_served_later(cluster: Cluster) -> None:
    client = await ChatClient.open(cluster.ws_url(0))
    await client.send({"type": "login", "name": "early"})
    # Nobody to answer yet: the gateway says its event waits, and the connection stays.
    await asyncio.to_thread(cluster.wait_log, "gateway0", "no worker linked, queueing events")
    assert client.ws.state.name == "OPEN"
    cluster.workers.append(None)
    cluster.start_worker(0)
    assert (await client.expect("user_list"))["user_list"][0]["name"] == "early"
    assert (await client.expect("login"))["name"] == "early"


@pytest.mark.parametrize(
    "cluster",
    [{"gateways": 1, "workers": 0, "gateway_args": ["--max-waiting", "5"]}],
    indirect=True,
)
async def test_a_full_waiting_queue_closes_with_1013(cluster: Cluster) -> None:
    client = await ChatClient.open(cluster.ws_url(0))  # its connect event is queued: 1
    with contextlib.suppress(ConnectionClosed, OSError):  # closed while still sending
        for i in range(10):
            await client.send({"type": "say", "to_uid": "all", "content": str(i)})
    assert (await client.closed())[0] == 1013
    assert "queue full" in cluster.logs()


@pytest.mark.parametrize("cluster", [{"gateways": 1, "workers": 1}], indirect=True)
async def test_client_ids_are_never_reused_after_a_gateway_restart(cluster: Cluster) -> None:
    before = [await ChatClient.open(cluster.ws_url(0)) for _ in range(3)]
    for i, client in enumerate(before):
        await client.login(f"b{i}", room="ids")
    cluster.stop_gateway(0)
    cluster.start_gateway(0)
    after = await ChatClient.open(cluster.ws_url(0))
    await after.login("a", room="ids")
    assert after.uid not in {c.uid for c in before}
    assert after.uid > max(c.uid for c in before)
    assert after.uid < 2**53


@pytest.mark.parametrize(
    "cluster", [{"gateways": 2, "workers": 1, "shared_port": True}], indirect=True
)
async def test_gateways_share_one_port(cluster: Cluster) -> None:
    clients = [await ChatClient.open(cluster.ws_url(0)) for _ in range(24)]
    deadline = time.monotonic() + TIMEOUT
    counts: list[int] = []
    while sum(counts) != len(clients):  # until the gateways' next reports say so
        assert time.monotonic() < deadline, f"the register counts {counts}"
        await asyncio.sleep(0.05)
        status = cluster.status() or {"gateways": []}
        counts = [g["connections"] for g in status["gateways"]]
    assert len(counts) == 2 and min(counts) > 0, counts
    for client in clients:
        await client.close()


@pytest.mark.parametrize("cluster", [{"gateways": 2, "workers": 1, "registers": 2}], indirect=True)
async def test_a_second_register_keeps_the_cluster_discoverable(cluster: Cluster) -> None:
    clients = await room(cluster, 2, "twin")
    cluster.stop_register(0)
    # A worker started now only reaches the second register, and still finds both gateways.
    cluster.workers.append(None)
    cluster.start_worker(1)
    cluster.stop_worker(0)  # the chat now depends on the newcomer alone
    await clients[0].say("via register 2")
    for client in clients:
        assert (await client.expect("say"))["content"] == "via register 2"


@pytest.mark.parametrize("cluster", [{"gateways": 2, "workers": 1}], indirect=True)
async def test_a_dead_gateway_is_dropped_within_seconds(cluster: Cluster) -> None:
    gone = cluster.gateway_id(1)
    cluster.kill_gateway(1)
    start = time.monotonic()
    said = f"gateway gone id={gone} (its link dropped"
    await asyncio.to_thread(cluster.wait_log, "register0", said, TIMEOUT)
    await asyncio.to_thread(cluster.wait_ready, TIMEOUT)  # and the worker dropped it too
    took = time.monotonic() - start
    print(f"dead gateway dropped after {took:.1f} s")
    assert took < 8
    # The survivor still serves.
    client = await ChatClient.open(cluster.ws_url(0))
    await client.login("alone", room="survivor")


@pytest.mark.parametrize("cluster", [{"gateways": 2, "workers": 2}], indirect=True)
async def test_a_killed_gateways_clients_get_on_close(cluster: Cluster) -> None:
    """A dead gateway sends no close events; the workers run on_close for its clients."""
    clients = await room(cluster, 6, "dead")  # 0, 2, 4 on gateway 0; 1, 3, 5 on gateway 1
    survivors, lost = clients[0::2], clients[1::2]
    cluster.kill_worker(1)  # so some of gateway 1's clients are known only through ADOPT
    cluster.wait_ready()  # both gateways saw it go (and re-bound its clients)
    await clients[0].say("before")
    for client in survivors:
        assert (await client.expect("say"))["content"] == "before"
    start = time.monotonic()
    cluster.kill_gateway(1)
    for client in survivors:
        gone = {(await client.expect("logout", timeout=15))["uid"] for _ in lost}
        assert gone == {c.uid for c in lost}
    print(f"logouts of a killed gateway's clients after {time.monotonic() - start:.1f} s")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "cluster",
    [{"gateways": 2, "workers": 1, "gateway_args": ["--drain-batch", "10", "--drain-time", "3"]}],
    indirect=True,
)
async def test_a_stopping_gateway_drains_its_clients_in_batches(cluster: Cluster) -> None:
    clients = [await ChatClient.open(cluster.ws_url(1)) for _ in range(40)]
    watcher = await ChatClient.open(cluster.ws_url(0))
    await watcher.login("watcher", room="drain")
    for i, client in enumerate(clients):
        await client.login(f"d{i}", room="drain")
        await watcher.expect("login")
    start = time.monotonic()
    stopper = asyncio.create_task(asyncio.to_thread(cluster.stop_gateway, 1))
    closes = await asyncio.gather(*(client.closed() for client in clients))
    await stopper
    took = time.monotonic() - start
    assert {code for code, _ in closes} == {1012}
    assert took < 3 + 2
    logouts = {(await watcher.expect("logout"))["uid"] for _ in clients}
    assert logouts == {c.uid for c in clients}  # every on_close ran before the gateway left
    assert "draining clients=40 batch=10" in cluster.logs()
