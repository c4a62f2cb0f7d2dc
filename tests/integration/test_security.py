"""CURVE on the internal links, refusals, the loopback guard, and wss:// for clients."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatcluster import keys as curve
from tests.chat import ChatClient
from tests.cluster import ROOT, Cluster, free_port


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return curve.generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secure_cluster(key_file: Path) -> Iterator[Cluster]:
    with Cluster(gateways=2, workers=2, env={curve.ENV_KEY: str(key_file)}) as cluster:
        yield cluster


def wait_for_log(cluster: Cluster, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in cluster.logs():
        assert time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.1)


async def test_the_chat_works_over_curve(secure_cluster: Cluster) -> None:
    a = await ChatClient.open(secure_cluster.ws_url(0))
    b = await ChatClient.open(secure_cluster.ws_url(1))
    await a.login("a", room="curve")
    await b.login("b", room="curve")
    await a.expect("login")
    await b.say("encrypted inside")
    assert (await a.expect("say"))["content"] == "encrypted inside"
    assert "curve=on" in secure_cluster.logs()


def test_a_worker_with_another_key_is_refused_and_logged(
    secure_cluster: Cluster, tmp_path: Path
) -> None:
    other = curve.generate(tmp_path / "other")
    secure_cluster.workers.append(None)
    secure_cluster.start_worker(2, wait=False, args=["--curve-key", str(other)])
    wait_for_log(secure_cluster, "refused a peer")
    status = secure_cluster.status()
    assert status is not None and len(status["workers"]) == 2  # the intruder never joined
    secure_cluster.stop_worker(2)


def test_a_worker_without_keys_is_refused(secure_cluster: Cluster) -> None:
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "businessworker",
            "--app",
            "businessworker.chat",
            "--register",
            secure_cluster.register_address,
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != curve.ENV_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_log(secure_cluster, "CURVE handshake failed")
        status = secure_cluster.status()
        assert status is not None and len(status["workers"]) == 2
    finally:
        worker.terminate()
        worker.wait(10)


def test_binding_beyond_loopback_without_keys_refuses_to_start() -> None:
    for argv in (
        ["register", "--bind", f"tcp://0.0.0.0:{free_port()}"],
        ["gateway", "--internal", "tcp://0.0.0.0:*", "--listen", f"127.0.0.1:{free_port()}"],
    ):
        run = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
            env={k: v for k, v in os.environ.items() if k != curve.ENV_KEY},
        )
        assert run.returncode != 0
        assert "refusing to bind" in run.stderr


def test_loopback_detection() -> None:
    assert curve.is_local("tcp://127.0.0.1:1236")
    assert curve.is_local("tcp://127.3.0.9:*")
    assert curve.is_local("tcp://[::1]:5")
    assert curve.is_local("ipc:///tmp/x")
    assert not curve.is_local("tcp://0.0.0.0:1236")
    assert not curve.is_local("tcp://*:1236")
    assert not curve.is_local("tcp://10.77.0.1:1236")


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
