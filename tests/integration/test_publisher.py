"""businessworker.Cluster and AsyncCluster: the API from outside any worker.

A real cluster (2 gateways, the probe app), probes on both gateways, and the
publisher clients in this process (the sync one runs its own thread). Every
query is compared with the same call made by a worker (through the probe);
every command's effect is seen by the probes, a marker after it showing that
nothing else came.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from businessworker import AsyncCluster, Cluster, ClusterUnavailable, NotConfirmed
from businessworker.cluster import QUERIES
from businessworker.testing import TIMEOUT
from tests.cluster import ROOT
from tests.cluster import Cluster as LocalCluster
from tests.integration.test_api import Probe, no_probe_outlives_its_test  # noqa: F401


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(gateways=2, workers=1, app="tests.apps.probe") as cluster:
        yield cluster


def options(cluster: LocalCluster) -> dict[str, Any]:
    return {"register": cluster.register_address, "curve_key": str(cluster.key_file)}


@pytest.fixture
def sync(cluster: LocalCluster) -> Iterator[Cluster]:
    client = Cluster(**options(cluster))
    yield client
    client.close()


@pytest.fixture
async def aclient(cluster: LocalCluster) -> AsyncIterator[AsyncCluster]:
    client = AsyncCluster(**options(cluster))
    yield client
    await client.close()


def normal(value: Any) -> Any:
    """What a worker's answer looks like after the probe's JSON (int keys as strings)."""
    if isinstance(value, dict):
        value = {str(k): v for k, v in value.items()}
    return json.loads(json.dumps(value))


async def until(probe: Probe, marker: str) -> list[Any]:
    """Every push ``probe`` gets up to the ``marker`` string, which is not included."""
    got = []
    while (message := await probe.push()) != marker:
        got.append(message)
    return got


async def test_every_query_answers_as_in_a_worker(
    cluster: LocalCluster, sync: Cluster, aclient: AsyncCluster
) -> None:
    a, b = await Probe.open(cluster.ws_url(0)), await Probe.open(cluster.ws_url(1))
    await a.call("join_group", a.id, "pq")
    await a.call("join_group", b.id, "pq")
    await a.call("bind_uid", b.id, "user-b")
    await b.call("session", role="b")
    calls: dict[str, list[Any]] = {
        "is_online": [b.id],
        "is_uid_online": ["user-b"],
        "get_session": [b.id],
        "get_uid_by_client_id": [b.id],
        "get_client_ids_by_uid": ["user-b"],
        "get_client_sessions_by_group": ["pq"],
        "get_client_ids_by_group": ["pq"],
        "get_uids_by_group": ["pq"],
        "get_client_count_by_group": ["pq"],
        "get_all_group_ids": [],
        "get_all_client_count": [],
        "get_all_client_sessions": [],
    }
    assert sorted(calls) == sorted(QUERIES)
    for name, args in calls.items():
        from_worker = await a.call(name, *args)
        from_sync = await asyncio.to_thread(getattr(sync, name), *args)
        from_async = await getattr(aclient, name)(*args)
        assert normal(from_sync) == normal(from_async) == from_worker, name
    await a.close()
    await b.close()


async def test_every_command_takes_effect(
    cluster: LocalCluster, sync: Cluster, aclient: AsyncCluster
) -> None:
    a, b = await Probe.open(cluster.ws_url(0)), await Probe.open(cluster.ws_url(1))
    for who, client in (("sync", sync), ("async", aclient)):

        async def do(name: str, *args: Any, _client: Any = client, **kwargs: Any) -> Any:
            call = getattr(_client, name)
            if isinstance(_client, Cluster):
                return await asyncio.to_thread(call, *args, **kwargs)
            return await call(*args, **kwargs)

        await do("send_to_client", b.id, f"{who} one")
        await do("send_to_clients", [a.id, b.id], {"to": "both"})
        await do("send_to_all", f"{who} all", exclude=[a.id])
        assert await do("join_group", a.id, f"g-{who}") is True
        assert await do("join_group", b.id, f"g-{who}") is True
        await do("send_to_group", f"g-{who}", "group", exclude=[b.id])
        await do("leave_group", a.id, f"g-{who}")
        assert await a.call("get_client_ids_by_group", f"g-{who}") == [b.id]
        await do("ungroup", f"g-{who}")
        assert await a.call("get_client_ids_by_group", f"g-{who}") == []
        await do("bind_uid", a.id, f"u-{who}")
        await do("send_to_uid", f"u-{who}", "by uid")
        await do("unbind_uid", a.id, f"u-{who}")
        assert await a.call("get_uid_by_client_id", a.id) is None
        await do("set_session", b.id, {"set": who})
        await do("update_session", b.id, {"more": 1})
        assert await a.call("get_session", b.id) == {"set": who, "more": 1}
        await do("send_to_all", "marker")
        assert await until(a, "marker") == [{"to": "both"}, "group", "by uid"]
        assert await until(b, "marker") == [f"{who} one", {"to": "both"}, f"{who} all"]
        c = await Probe.open(cluster.ws_url(1))
        await do("close_client", c.id, "bye", code=4001)
        assert await c.push() == "bye"
        with pytest.raises(Exception, match="4001"):
            await c.push()
    await a.close()
    await b.close()


def _child_send(opts: dict[str, Any], client: Cluster, target: int, n: int) -> None:
    client.send_to_client(target, f"child {n}")


async def test_forked_children_each_send_once(cluster: LocalCluster) -> None:
    """The client is used, then 4 children are forked (gunicorn, Celery prefork): each
    sends on its own links; nothing hangs, every message arrives once."""
    a = await Probe.open(cluster.ws_url(0))
    client = Cluster(**options(cluster))
    await asyncio.to_thread(client.send_to_client, a.id, "parent")
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=_child_send, args=(options(cluster), client, a.id, n))
        for n in range(4)
    ]
    for child in children:
        child.start()
    for child in children:
        await asyncio.to_thread(child.join, 30)
        assert child.exitcode == 0
    await asyncio.to_thread(client.send_to_client, a.id, "marker")
    got = await until(a, "marker")
    assert got[0] == "parent" and sorted(got[1:]) == [f"child {n}" for n in range(4)]
    await asyncio.to_thread(client.close)
    await a.close()


async def test_a_keyed_send_takes_effect_once(cluster: LocalCluster, sync: Cluster) -> None:
    """The same key 3 times, from this client and from another one (another process
    would be the same), and again after the recipient's gateway restarted."""
    a = await Probe.open(cluster.ws_url(1))
    await a.call("bind_uid", a.id, "keyed")
    for _ in range(3):
        await asyncio.to_thread(sync.send_to_uid, "keyed", "once", key="k-1")
    other = AsyncCluster(**options(cluster))
    await other.send_to_uid("keyed", "once", key="k-1")  # the gateway's memory, not ours
    await other.close()
    await asyncio.to_thread(sync.send_to_uid, "keyed", "marker")
    assert await until(a, "marker") == ["once"]
    await a.close()
    await asyncio.to_thread(cluster.stop_gateway, 1)
    await asyncio.to_thread(cluster.start_gateway, 1)
    restarted = await asyncio.to_thread(cluster.gateway_id, 1)
    deadline = time.monotonic() + TIMEOUT
    while restarted not in await asyncio.to_thread(lambda: sync.gateways):
        assert time.monotonic() < deadline, f"the publisher never saw gateway {restarted}"
        await asyncio.sleep(0.05)
    again = await Probe.open(cluster.ws_url(1))
    await again.call("bind_uid", again.id, "keyed")
    await asyncio.to_thread(sync.send_to_uid, "keyed", "once", key="k-1")
    await asyncio.to_thread(sync.send_to_uid, "keyed", "after restart")  # a new gateway: found
    assert await until(again, "after restart") == []
    await again.close()


async def test_no_register_is_a_clear_error_in_time() -> None:
    client = AsyncCluster("tcp://127.0.0.1:9", insecure=True, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(ClusterUnavailable, match="no gateway"):
        await client.send_to_all("nobody")
    assert time.monotonic() - start < 3
    await client.close()
    sync = Cluster("tcp://127.0.0.1:9", insecure=True, timeout=1.0)
    with pytest.raises(ClusterUnavailable):
        sync.get_all_client_count()
    sync.close()
    assert not [t for t in threading.enumerate() if t.name == "chatcluster-client"]


async def test_all_gateways_down_then_one_back() -> None:
    with LocalCluster(gateways=1, workers=1, app="tests.apps.probe") as small:
        client = AsyncCluster(**options(small), timeout=1.5)
        await client.get_all_client_count()
        await asyncio.to_thread(small.stop_gateway, 0)
        deadline = time.monotonic() + 30
        while True:  # until the register has dropped it: then there is no gateway at all
            try:
                await client.send_to_all("into the void")
            except ClusterUnavailable:
                break
            except NotConfirmed:
                pass
            assert time.monotonic() < deadline
        await asyncio.to_thread(small.start_gateway, 0)
        probe = await Probe.open(small.ws_url(0))
        await client.send_to_all("you again")
        assert await probe.push() == "you again"
        await probe.close()
        await client.close()


async def test_command_line_send_and_query(cluster: LocalCluster) -> None:
    env = {
        **os.environ,
        "CHAT_REGISTER": cluster.register_address,
        "CHAT_CURVE_KEY": str(cluster.key_file),
    }

    async def run(*args: str, env: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "businessworker", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    a = await Probe.open(cluster.ws_url(0))
    sent = await run("send", "--client", str(a.id), '{"from":"cli"}')
    assert sent.returncode == 0 and sent.stdout == "", sent
    assert await a.push() == {"from": "cli"}
    asked = await run("query", "is_online", str(a.id))
    assert asked.returncode == 0 and json.loads(asked.stdout) is True, asked
    Probe.others_closed(a)  # so the cluster's only client is a
    count = await run("query", "get_all_client_count")
    assert json.loads(count.stdout) == 1, count
    wrong = await run("query", "is_online")
    assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1, wrong
    await a.close()
    lost = await run(
        "send", "--all", "x", "--timeout", "1", env={**env, "CHAT_REGISTER": "tcp://127.0.0.1:9"}
    )
    assert lost.returncode == 1 and "no gateway" in lost.stderr
    assert len(lost.stderr.splitlines()) == 1, lost.stderr


def example_env(cluster: LocalCluster) -> dict[str, str]:
    return {"CHAT_REGISTER": cluster.register_address, "CHAT_CURVE_KEY": str(cluster.key_file)}


async def test_fastapi_example(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    testclient = pytest.importorskip("fastapi.testclient", reason="pip install -e '.[test]'")
    for name, value in example_env(cluster).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, "examples.fastapi_notify", raising=False)
    module = importlib.import_module("examples.fastapi_notify")
    fan = await Probe.open(cluster.ws_url(0))
    await fan.call("bind_uid", fan.id, "fan")

    def post() -> list[Any]:
        with testclient.TestClient(module.app) as http:
            return [
                http.post("/notify/fan", json={"text": "hi"}).json(),
                http.post("/notify/nobody", json={"text": "lost"}).json(),
            ]

    assert await asyncio.to_thread(post) == [{"online": True}, {"online": False}]
    assert await fan.push() == {"type": "notice", "text": "hi"}
    await fan.close()


async def test_background_jobs_example(cluster: LocalCluster) -> None:
    fan = await Probe.open(cluster.ws_url(1))
    await fan.call("bind_uid", fan.id, "shopper")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "examples.background_jobs", "shopper", "nobody", "shopper"],
        cwd=ROOT,
        env={**os.environ, **example_env(cluster)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [True, False, True]
    got = [await fan.push(), await fan.push()]
    assert sorted(m["order"] for m in got) == [0, 2]
    await fan.close()
