"""Three hosts made of network namespaces, each running its role under supervisor, CURVE on.

    host A 10.77.0.1   deploy/run register,gateway   the register and 1 gateway
    host B 10.77.0.2   deploy/run gateway            2 gateways on one public port
    host C 10.77.0.3   deploy/run worker             2 business workers

Each host gets its own small settings file (CHAT_CONFIG), as on real machines, and the
cluster key from `python -m register keys`. A binds its internal port on its address;
B binds 0.0.0.0 and advertises 10.77.0.2 (bind vs advertise). Chat clients run inside
A's and B's namespaces (tests/deploy/driver.py): nothing outside the namespaces ever
talks to a 10.77 address.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from businessworker.testing import TIMEOUT
from tests.cluster import ROOT
from tests.deploy.netns import Network, Unavailable
from tests.deploy.supervised import DEPLOY, Supervised, clean_env, mesh, status_in

pytestmark = [pytest.mark.deploy, pytest.mark.netns]

INTERNAL_PORT = 7300
WS_PORT = 7272


class Driver:
    """tests/deploy/driver.py running on one host; call(op, **fields) -> result."""

    def __init__(self, prefix: list[str], log: Path, module: str = "tests.deploy.driver") -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", module],
            cwd=ROOT,
            env=clean_env(CHAT_TEST_TIMEOUT=str(TIMEOUT)),  # the same unit in there
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def __call__(self, op: str, timeout: float = 2 * TIMEOUT, **fields: Any) -> Any:
        """Send one request; ``timeout`` bounds the answer (the driver's own waits take
        up to TIMEOUT)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        try:
            answer = json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise TimeoutError(f"driver: no answer to {op} {fields}") from None
        if not answer["ok"]:
            raise AssertionError(f"driver {op} {fields}: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


class Hosts:
    def __init__(self, net: Network, base: Path) -> None:
        self.net = net
        self.base = base
        keys = subprocess.run(
            [sys.executable, "-m", "register", "keys", "--out", str(base / "keys")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        self.key = base / "keys" / "cluster.key_secret"
        assert self.key.exists(), keys.stdout
        a, b = net.addresses["a"], net.addresses["b"]
        self.register = f"tcp://{a}:1236"
        common = {"CHAT_REGISTER": self.register, "CHAT_CURVE_KEY": str(self.key)}
        self.a = Supervised(
            "register,gateway",
            {
                **common,
                "CHAT_REGISTER_BIND": self.register,
                "CHAT_GATEWAYS": 1,
                "CHAT_LISTEN": f"{a}:{WS_PORT}",
                "CHAT_INTERNAL_BIND": a,
                "CHAT_INTERNAL_PORT": INTERNAL_PORT,
            },
            base=base,
            netns=net.names["a"],
            label="a",
        )
        self.b = Supervised(
            "gateway",
            {
                **common,
                "CHAT_GATEWAYS": 2,
                "CHAT_LISTEN": f"0.0.0.0:{WS_PORT}",
                "CHAT_INTERNAL_BIND": "0.0.0.0",
                "CHAT_INTERNAL_PORT": INTERNAL_PORT,
                "CHAT_ADVERTISE": b,
            },
            base=base,
            netns=net.names["b"],
            label="b",
        )
        self.c = Supervised(
            "worker",
            {**common, "CHAT_WORKERS": 2},
            base=base,
            netns=net.names["c"],
            label="c",
        )
        self.all = [self.a, self.b, self.c]

    def status(self) -> dict[str, Any] | None:
        return status_in(self.a)

    def wait_mesh(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.status()
            if mesh(status, 3, 2):
                return status
            time.sleep(0.2)
        logs = "\n".join(h.logs() for h in self.all)
        raise TimeoutError(f"no 3x2 mesh across the hosts: {status}\n{logs}")


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    base = Path(tempfile.mkdtemp(prefix="cd-multi-"))
    try:
        net = Network(["a", "b", "c"]).__enter__()
    except Unavailable as exc:
        pytest.skip(f"cannot build hosts from network namespaces here: {exc}")
    started: list[Supervised] = []
    try:
        h = Hosts(net, base)
        for sup in h.all:
            sup.start()
            started.append(sup)
        for sup in h.all:
            sup.wait_running()
        h.wait_mesh()
        yield h
    finally:
        # Gateway hosts first (their drain needs the workers), then the worker host.
        gateways = [s for s in started if s.label in "ab"]
        with ThreadPoolExecutor() as pool:
            logs = list(zip(gateways, pool.map(Supervised.stop, gateways), strict=True))
        logs += [(s, s.stop()) for s in started if s not in gateways]
        net.down()
    for sup, log in logs:
        sup.assert_stopped_cleanly(log)
    shutil.rmtree(base, ignore_errors=True)  # kept when something failed


@pytest.fixture
def drivers(hosts: Hosts) -> Iterator[dict[str, Driver]]:
    out = {host: Driver(hosts.net.exec(host), hosts.base / f"driver-{host}.log") for host in "ab"}
    try:
        yield out
    finally:
        for d in out.values():
            d.close()


def test_each_host_runs_its_role_and_the_cluster_spans_them(hosts: Hosts) -> None:
    status = hosts.status()
    assert status is not None
    addresses = sorted(g["address"] for g in status["gateways"])
    assert addresses == [
        f"tcp://10.77.0.1:{INTERNAL_PORT}",
        f"tcp://10.77.0.2:{INTERNAL_PORT}",
        f"tcp://10.77.0.2:{INTERNAL_PORT + 1}",
    ]
    worker_pids = {i["pid"] for i in hosts.c.infos().values()}
    assert {w["pid"] for w in status["workers"]} == worker_pids
    assert all(w["gateways"] == 3 for w in status["workers"])
    assert sorted(hosts.a.infos()) == ["gateway:gateway0", "register"]
    assert sorted(hosts.b.infos()) == ["gateway:gateway0", "gateway:gateway1"]
    assert "curve=on" in hosts.a.logs("register.log")


def test_chat_crosses_hosts(hosts: Hosts, drivers: dict[str, Driver]) -> None:
    a, b = drivers["a"], drivers["b"]
    url = {"a": f"ws://10.77.0.1:{WS_PORT}/", "b": f"ws://10.77.0.2:{WS_PORT}/"}
    # a0 and a1 on host A's gateway, b0 and b1 on host B's (either of its two gateways).
    order = [(a, "a0"), (b, "b0"), (a, "a1"), (b, "b1")]
    uids: dict[str, int] = {}
    for i, (d, name) in enumerate(order):
        d("open", name=name, url=url[name[0]])
        got = d("login", name=name, nick=name, room="x")
        # The user list is cluster-wide: users of every gateway on both hosts, oldest first.
        assert [u["name"] for u in got["users"]] == [n for _, n in order[: i + 1]]
        uids[name] = got["uid"]
        for earlier_d, earlier in order[:i]:
            assert earlier_d("expect", name=earlier, type="login")["uid"] == got["uid"]

    a("say", name="a0", content="from A")
    for d, name in order:
        message = d("expect", name=name, type="say")
        assert (message["content"], message["from_uid"]) == ("from A", uids["a0"])
    b("say", name="b1", content="from B")
    for d, name in order:
        assert d("expect", name=name, type="say")["content"] == "from B"

    # A private say from A to B: the recipient and the sender get it, nobody else.
    a("say", name="a1", content="psst", to=uids["b0"])
    for d, name in [(b, "b0"), (a, "a1")]:
        message = d("expect", name=name, type="say")
        assert (message["content"], message["to_uid"]) == ("psst", uids["b0"])
    # Nothing reached the others: a1's next private say to each comes first (a1's says
    # are handled in order), and a1 gets its own copies of those with nothing between.
    for d, name in [(a, "a0"), (b, "b1")]:
        a("say", name="a1", content=f"marker for {name}", to=uids[name])
        d("fenced", name=name, marker=f"marker for {name}")
        a("fenced", name="a1", marker=f"marker for {name}")

    # A logout on B reaches A.
    b("close", name="b1")
    for d, name in [(a, "a0"), (a, "a1"), (b, "b0")]:
        assert d("expect", name=name, type="logout")["uid"] == uids["b1"]


def test_a_worker_with_another_key_is_refused(hosts: Hosts) -> None:
    other = hosts.base / "other"
    subprocess.run(
        [sys.executable, "-m", "register", "keys", "--out", str(other)],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=True,
    )
    intruder = subprocess.Popen(
        [
            *hosts.net.exec("c"),
            sys.executable,
            "-m",
            "businessworker",
            "--app",
            "businessworker.chat",
            "--register",
            hosts.register,
            "--curve-key",
            str(other / "cluster.key_secret"),
        ],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while "refused a peer" not in hosts.a.logs("register.log"):
            assert time.monotonic() < deadline, "the register never logged the refusal"
            time.sleep(0.05)
        status = hosts.status()
        assert status is not None and len(status["workers"]) == 2
    finally:
        intruder.terminate()
        intruder.wait(10)


def test_reload_workers_on_the_worker_host(hosts: Hosts, drivers: dict[str, Driver]) -> None:
    before = {i["pid"] for i in hosts.c.infos().values()}
    run = hosts.c.run(str(DEPLOY / "reload-workers"), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)
    after = {i["pid"] for i in hosts.c.infos().values()}
    assert not before & after
    hosts.wait_mesh()
    a, b = drivers["a"], drivers["b"]
    a("open", name="p", url=f"ws://10.77.0.1:{WS_PORT}/")
    b("open", name="q", url=f"ws://10.77.0.2:{WS_PORT}/")
    a("login", name="p", nick="p", room="after")
    b("login", name="q", nick="q", room="after")
    a("expect", name="p", type="login")
    b("say", name="q", content="new code")
    assert a("expect", name="p", type="say")["content"] == "new code"


def test_a_gateway_host_cut_off_from_the_worker_host_for_10_s(hosts: Hosts) -> None:
    """B's two gateways and C's workers lose each other (blackhole routes inside their
    namespaces) for 10 s, under chat load from members on A and B: then the link
    comes back. Every member loses nothing, sees nothing twice, in order."""
    b, c = hosts.net.addresses["b"], hosts.net.addresses["c"]
    load = Driver(hosts.net.exec("a"), hosts.base / "load.log", "tests.deploy.load_driver")
    try:
        urls = [f"ws://10.77.0.1:{WS_PORT}/", f"ws://10.77.0.2:{WS_PORT}/"]
        load("open", urls=urls, size=100, senders=4, timeout=120)
        load("start")
        time.sleep(1)  # load first, then the fault
        cut = [
            ("-n", hosts.net.names["b"], "route", "add", "blackhole", f"{c}/32"),
            ("-n", hosts.net.names["c"], "route", "add", "blackhole", f"{b}/32"),
        ]
        for args in cut:
            subprocess.run(["ip", *args], check=True, timeout=20)
        try:
            time.sleep(10)  # the fault itself: 10 s apart
        finally:
            for args in cut:
                subprocess.run(["ip", *[a if a != "add" else "del" for a in args]], timeout=20)
        hosts.wait_mesh()
        result = load("end", timeout=120)
        print(f"10 s partition of B and C: {result}")
        assert not result["errors"], result["errors"]
        assert (result["lost"], result["duplicated"], result["out_of_order"]) == (0, 0, 0)
        assert result["reconnected"] == 0  # nobody was closed
        load("rosters")
        assert load("twice") == []
    finally:
        load.close()
