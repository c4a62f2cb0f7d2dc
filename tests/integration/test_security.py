"""The internal links against a local attacker, and wss:// for clients.

Each attack is tried on a cluster started with the defaults, as ``make run``
starts it (every process finds, or makes, the cluster key in its state folder),
where it must fail; and on the same cluster started ``--insecure``, where it
works, so that each test shows it could fail. The attacker is any local account:
plain ZeroMQ sockets on the loopback ports, no key.

Nothing here waits to see that nothing happens: a refusal is a log line (the
peer's handshake failed, so nothing it sent can have been read), and what must
not reach a client is followed by a marker that must come first.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from chatcluster import keys as curve
from gateway import protocol as gp
from register import protocol as rp
from tests.chat import ChatClient
from tests.cluster import ROOT, Cluster, free_port


@pytest.fixture(scope="module")
def secured() -> Iterator[Cluster]:
    with Cluster(gateways=1, workers=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def opened() -> Iterator[Cluster]:
    with Cluster(gateways=1, workers=2, insecure=True) as cluster:
        yield cluster


def wait_for_log(cluster: Cluster, text: str, count: int = 1, timeout: float = 15) -> str:
    """Until ``text`` was logged ``count`` times (by any process of the cluster)."""
    deadline = time.monotonic() + timeout
    while (logs := cluster.logs()).count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} time(s)"
        time.sleep(0.05)
    return logs


class Attacker:
    """A plain ZeroMQ peer on an internal port: what any local account can open."""

    def __init__(self, address: str, routing_id: bytes | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self.sock.connect(address)
        self.sent = 0

    def refused(self, timeout: float = 15) -> None:
        """Until the peer refused our handshake: then nothing we sent was read, and
        nothing can have been sent to us."""
        assert self.monitor.poll(int(timeout * 1000)), "the handshake was not refused"
        assert self.sock.poll(0) == 0

    def send(self, *messages: list[Any]) -> None:
        """One message as a worker session sends it: numbered, then the frames."""
        self.sent += 1
        self.sock.send_multipart([gp.header(self.sent), *(gp.pack(m) for m in messages)])

    def send_register(self, message: list[Any]) -> None:
        self.sock.send(rp.pack(message))

    def recv(self, timeout: float = 10) -> list[bytes] | None:
        """The next message, or None if none came within ``timeout``."""
        if self.sock.poll(int(timeout * 1000)):
            return self.sock.recv_multipart()
        return None

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def listen(port: int) -> zmq.Socket:
    """A ROUTER on a loopback port: where a fake gateway would take its workers' links."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    return sock


def internal(cluster: Cluster) -> str:
    status = cluster.status()
    assert status is not None
    return status["gateways"][0]["address"]


async def pair(cluster: Cluster, room: str) -> tuple[ChatClient, ChatClient]:
    a = await ChatClient.open(cluster.ws_url(0))
    b = await ChatClient.open(cluster.ws_url(0))
    await a.login("alice", room=room)
    await b.login("bob", room=room)
    await a.expect("login")
    return a, b


def forged(uid: int, content: str = "forged") -> str:
    return json.dumps({"type": "say", "from_uid": uid, "to_uid": "all", "content": content})


# The gateway's internal port


async def test_a_forged_say_reaches_nobody(secured: Cluster, opened: Cluster) -> None:
    a, b = await pair(secured, "forge")
    attacker = Attacker(internal(secured))
    attacker.send([gp.SEND_ALL, forged(a.uid), []])
    attacker.refused()
    await a.say("marker")
    assert (await b.expect("say"))["content"] == "marker"
    attacker.close()

    a, b = await pair(opened, "forge")
    attacker = Attacker(internal(opened), routing_id=b"intruder-1")
    attacker.send([gp.SEND_ALL, forged(a.uid, "before joining"), []])  # ignored
    wait_for_log(opened, "ignored a command from a peer that has not joined")
    attacker.close()
    attacker = Attacker(internal(opened), routing_id=b"intruder-1b")  # a session that joins
    attacker.send([gp.HELLO, "intruder-1b", {}], [gp.SEND_ALL, forged(a.uid), []])
    said = await b.expect("say")
    assert said["content"] == "forged" and said["from_uid"] == a.uid  # the attack works here
    attacker.close()


async def test_sessions_cannot_be_read(secured: Cluster, opened: Cluster) -> None:
    await pair(secured, "read")
    attacker = Attacker(internal(secured))
    attacker.send([gp.QUERY, 1, gp.Q_ALL_SESSIONS, []])
    attacker.refused()
    attacker.close()

    await pair(opened, "read")
    attacker = Attacker(internal(opened), routing_id=b"intruder-2")
    attacker.send([gp.HELLO, "intruder-2", {}], [gp.QUERY, 1, gp.Q_ALL_SESSIONS, []])
    while (reply := attacker.recv()) is not None:
        message = gp.unpack(reply[-1])
        if message[0] == gp.REPLY:
            break
    assert reply is not None
    names = {gp.unpack_session(packed).get("name") for _, packed in message[2]}
    assert "alice" in names
    attacker.close()


async def test_a_client_cannot_be_closed(secured: Cluster, opened: Cluster) -> None:
    a, b = await pair(secured, "close")
    attacker = Attacker(internal(secured))
    attacker.send([gp.CLOSE, b.uid, None, 1000])
    attacker.refused()
    await a.say("still here")
    assert (await b.expect("say"))["content"] == "still here"
    attacker.close()

    a, b = await pair(opened, "close")
    attacker = Attacker(internal(opened), routing_id=b"intruder-3")
    attacker.send([gp.HELLO, "intruder-3", {}], [gp.CLOSE, b.uid, None, 1000])
    assert (await b.closed())[0] == 1000
    attacker.close()


async def test_a_peer_cannot_join_as_a_worker(secured: Cluster, opened: Cluster) -> None:
    attacker = Attacker(internal(secured), routing_id=b"intruder-4")
    attacker.send([gp.HELLO, "intruder-4", {}])
    attacker.refused()
    clients = [await ChatClient.open(secured.ws_url(0)) for _ in range(4)]
    for i, client in enumerate(clients):  # every login is served by the real workers
        await client.login(f"user{i}", room="join")
    attacker.close()

    attacker = Attacker(internal(opened), routing_id=b"intruder-4")
    attacker.send([gp.HELLO, "intruder-4", {}])
    events = []
    for _ in range(6):  # events go round robin: one of these reaches the intruder
        await ChatClient.open(opened.ws_url(0))
        while (parts := attacker.recv(timeout=0.5 if events else 10)) is not None:
            events += [gp.unpack(f)[0] for f in parts[1:]]
        if gp.EVENT_CONNECT in events:
            break
    assert gp.EVENT_CONNECT in events
    attacker.close()


# The register


@pytest.fixture
def register_pair() -> Iterator[tuple[Cluster, Cluster]]:
    with (
        Cluster(gateways=1, workers=1) as secured,
        Cluster(gateways=1, workers=1, insecure=True) as opened,
    ):
        yield secured, opened


def fake_gateway(gid: str, address: str, prefixes: list[int]) -> list[Any]:
    entry = {
        "id": gid,
        "address": address,
        "prefixes": prefixes,
        "started": time.time(),
        "pid": 1,
        "host": "attacker",
        "connections": 0,
        "workers": 0,
    }
    return [rp.GATEWAY, entry]


def test_the_register_answers_and_admits_only_members(
    register_pair: tuple[Cluster, Cluster],
) -> None:
    secured, opened = register_pair
    # A fake gateway: workers would link to it and send it every broadcast.
    trap = free_port()
    listener = listen(trap)
    attacker = Attacker(secured.register_address)
    attacker.send_register([rp.STATUS])
    attacker.send_register(fake_gateway("f" * 12, f"tcp://127.0.0.1:{trap}", [7]))
    attacker.refused()  # no status for a stranger, and no announcement
    status = secured.status()
    assert status is not None and len(status["gateways"]) == 1
    attacker.close()

    attacker = Attacker(opened.register_address)
    attacker.send_register([rp.STATUS])
    answer = attacker.recv()
    assert answer is not None and rp.unpack(answer[0])[0] == rp.STATUS  # open to anyone
    attacker.send_register(fake_gateway("f" * 12, f"tcp://127.0.0.1:{trap}", [7]))
    assert listener.poll(15_000), "no worker linked to the fake gateway"
    assert gp.unpack(listener.recv_multipart()[2])[0] == gp.HELLO  # a worker linked to it
    attacker.close()
    listener.close(linger=0)


async def test_a_live_gateway_cannot_be_taken_over(
    register_pair: tuple[Cluster, Cluster],
) -> None:
    for cluster in register_pair:
        status = cluster.status()
        assert status is not None
        real = status["gateways"][0]
        attacker = Attacker(cluster.register_address)
        attacker.send_register(fake_gateway(real["id"], "tcp://127.0.0.1:9", real["prefixes"]))
        if cluster.keys is not None:
            attacker.refused()
        else:
            wait_for_log(cluster, "refused a second gateway with a live gateway's id")
        attacker.close()
        status = cluster.status()
        assert status is not None
        assert [g["address"] for g in status["gateways"]] == [real["address"]]
        a, b = await pair(cluster, "takeover")  # its workers kept their links
        await a.say("through")
        assert (await b.expect("say"))["content"] == "through"
    assert "no worker linked" not in register_pair[1].logs()


# Refusals are logged once per peer, on both ends


def test_a_member_with_another_key_is_refused_on_both_ends(
    secured: Cluster, tmp_path: Path
) -> None:
    other = curve.generate(tmp_path / "other")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "businessworker",
            "--app",
            "businessworker.chat",
            "--register",
            secured.register_address,
            "--curve-key",
            str(other),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # It retries every ~100 ms to 1 s; by its 5 s warning it was refused several times.
        lines = []
        assert worker.stdout is not None
        for line in worker.stdout:
            lines.append(line)
            if "no register answers" in line:
                break
        refused_by = [line for line in lines if "refused by register" in line]
        assert len(refused_by) == 1, lines
        assert "another cluster key" in refused_by[0]
        logs = secured.logs()
        assert logs.count("refused a peer with another cluster key") == 1
        status = secured.status()
        assert status is not None and len(status["workers"]) == 2  # it never joined
    finally:
        worker.terminate()
        worker.wait(10)


def test_a_plain_member_is_told_the_cluster_wants_a_key(secured: Cluster) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "register",
            "status",
            "--register",
            secured.register_address,
            "--insecure",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 1
    assert "refuses us: it requires the cluster key and we run --insecure" in run.stderr
    assert "Traceback" not in run.stderr


def test_status_needs_the_key(secured: Cluster, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "register", "status", "--register"]
    env = {**os.environ, **secured.env}
    run = subprocess.run(
        [*command, secured.register_address, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["gateways"]) == 1
    env[curve.ENV_STATE] = str(tmp_path)  # an account without the key
    run = subprocess.run(
        [*command, secured.register_address],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "no cluster key at" in run.stderr


def test_the_default_key_is_private(secured: Cluster) -> None:
    key = secured.key_file
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.parent.stat().st_mode & 0o777 == 0o700
    assert "curve=on" in secured.logs()


def test_insecure_says_so_at_start(opened: Cluster) -> None:
    logs = opened.logs()
    for name in ("register", "gateway", "worker"):
        assert "level=WARNING logger=chatcluster.keys --insecure" in logs, name
    assert logs.count("--insecure: the internal links are plain") == 4


def test_loopback_detection() -> None:
    assert curve.is_local("tcp://127.0.0.1:1236")
    assert curve.is_local("tcp://127.3.0.9:*")
    assert curve.is_local("tcp://[::1]:5")
    assert curve.is_local("ipc:///tmp/x")
    assert not curve.is_local("tcp://0.0.0.0:1236")
    assert not curve.is_local("tcp://*:1236")
    assert not curve.is_local("tcp://10.77.0.1:1236")


# wss:// for clients


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_clients_can_use_wss(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with Cluster(gateways=1, workers=1, gateway_args=args) as cluster:
        context = ssl.create_default_context(cafile=str(cert))
        from websockets.asyncio.client import connect

        url = cluster.ws_url(0).replace("ws://", "wss://")
        async with connect(url, ssl=context, compression=None) as ws:
            client = ChatClient(ws)
            await client.login("tls", room="tls")
            await client.say("over TLS")
            assert (await client.expect("say"))["content"] == "over TLS"
        await asyncio.sleep(0)
