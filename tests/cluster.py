"""Start a real cluster (register, gateways, workers) as processes, for tests and benchmarks.

Every process listens on a free loopback port, so tests never collide with a
running ``make run``. Readiness is read from the register's status (the same
answer ``python -m register status`` prints), not guessed with sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from businessworker.testing import TIMEOUT  # one unit for every wait: CHAT_TEST_TIMEOUT
from chatcluster import keys as curve
from register import protocol as register_protocol

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def register_status(
    address: str, timeout: float = 2.0, keys: curve.Keys | None = None
) -> dict[str, Any] | None:
    """The register's table, or None if it does not answer in time."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.client(sock)
    sock.connect(address)
    try:
        sock.send(register_protocol.pack([register_protocol.STATUS]))
        if not sock.poll(int(timeout * 1000)):
            return None
        return register_protocol.unpack(sock.recv())[1]
    finally:
        sock.close()


class Cluster:
    """A register, ``gateways`` gateways and ``workers`` workers running ``app``."""

    def __init__(
        self,
        *,
        gateways: int = 2,
        workers: int = 2,
        app: str = "businessworker.chat",
        gateway_args: list[str] | None = None,
        shared_port: bool = False,
        log_dir: str | None = None,
        env: dict[str, str] | None = None,
        registers: int = 1,
        insecure: bool = False,
        register_args: list[str] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="cluster-"))
        # The processes run with the defaults, as `make run` starts them: each finds
        # (or, the first, makes) the cluster key in its state folder, here a fresh
        # one per cluster instead of the account's.
        self.env = {curve.ENV_STATE: str(self.log_dir / "state"), **(env or {})}
        self.insecure = insecure
        self._keys: curve.Keys | None = None
        self.app = app
        self.n_gateways = gateways
        self.n_workers = workers
        self.gateway_args = gateway_args or []
        self.register_args = register_args or []
        """extra options of every register (e.g. --metrics)"""
        self.register_addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(registers)]
        self.register_address = self.register_addresses[0]
        if shared_port:  # every gateway on one port, as in production (SO_REUSEPORT)
            self.ws_ports = [free_port()] * gateways
        else:
            self.ws_ports = [free_port() for _ in range(gateways)]
        self.registers: list[subprocess.Popen[bytes] | None] = [None] * registers
        self.gateways: list[subprocess.Popen[bytes] | None] = [None] * gateways
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * workers
        self._starts = 0
        self.log_paths: dict[str, Path] = {}
        """process name (gateway0, worker1...) -> the log of its latest start"""

    @property
    def key_file(self) -> Path:
        """The cluster key the processes use (made by the first one to start)."""
        given = self.env.get(curve.ENV_KEY)
        return Path(given) if given else Path(self.env[curve.ENV_STATE]) / curve.KEY_NAME

    @property
    def keys(self) -> curve.Keys | None:
        if self.insecure:
            return None
        if self._keys is None and self.key_file.exists():
            self._keys = curve.load(self.key_file)
        return self._keys

    # Lifecycle

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def register(self) -> subprocess.Popen[bytes] | None:
        return self.registers[0]

    def start(self, timeout: float = 2 * TIMEOUT) -> None:
        for i in range(len(self.registers)):
            self.start_register(i)
        for i in range(self.n_gateways):
            self.start_gateway(i, wait=False)
        for i in range(self.n_workers):
            self.start_worker(i, wait=False)
        self.wait_ready(timeout=timeout)

    def stop(self) -> None:
        procs = [*self.workers, *self.gateways, *self.registers]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def ws_url(self, i: int = 0) -> str:
        return f"ws://127.0.0.1:{self.ws_ports[i]}/"

    # Processes

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self._starts += 1
        self.log_paths[name] = self.log_dir / f"{name}.{self._starts}.log"
        log = open(self.log_paths[name], "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _register_args(self) -> list[str]:
        args = [arg for address in self.register_addresses for arg in ("--register", address)]
        return [*args, "--insecure"] if self.insecure else args

    def start_register(self, i: int = 0) -> None:
        args = ["register", "--bind", self.register_addresses[i], *self.register_args]
        self.registers[i] = self._spawn(f"register{i}", [*args, *self._insecure_args()])

    def _insecure_args(self) -> list[str]:
        return ["--insecure"] if self.insecure else []

    def stop_register(self, i: int = 0) -> None:
        self._terminate(self.registers[i])
        self.registers[i] = None

    def start_gateway(self, i: int, *, wait: bool = True) -> None:
        self.gateways[i] = self._spawn(
            f"gateway{i}",
            [
                "gateway",
                *self._register_args(),
                "--listen",
                f"127.0.0.1:{self.ws_ports[i]}",
                *self.gateway_args,
            ],
        )
        if wait:
            self.wait_ready()

    def stop_gateway(self, i: int) -> None:
        self._terminate(self.gateways[i])
        self.gateways[i] = None

    def kill_gateway(self, i: int) -> None:
        self._kill(self.gateways[i])
        self.gateways[i] = None

    def start_worker(self, i: int, *, wait: bool = True, args: list[str] | None = None) -> None:
        self.workers[i] = self._spawn(
            f"worker{i}",
            ["businessworker", "--app", self.app, *self._register_args(), *(args or [])],
        )
        if wait:
            self.wait_ready()

    def stop_worker(self, i: int) -> None:
        self._terminate(self.workers[i])
        self.workers[i] = None

    def kill_worker(self, i: int) -> None:
        self._kill(self.workers[i])
        self.workers[i] = None

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    # Readiness

    def status(self) -> dict[str, Any] | None:
        """The table of the first register that is running."""
        for address, proc in zip(self.register_addresses, self.registers, strict=True):
            if proc is not None:
                if self.keys is None and not self.insecure:
                    return None  # the key is not made yet: nothing can be running
                return register_status(address, keys=self.keys)
        return None

    def wait_ready(self, timeout: float = 2 * TIMEOUT) -> dict[str, Any]:
        """Until every running gateway is linked to every running worker and vice versa."""
        gateways = sum(1 for p in self.gateways if p is not None)
        workers = sum(1 for p in self.workers if p is not None)
        deadline = time.monotonic() + timeout
        status: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            status = self.status()
            if (
                status is not None
                and len(status["gateways"]) == gateways
                and len(status["workers"]) == workers
                and all(g["workers"] == workers for g in status["gateways"])
                and all(w["gateways"] == gateways for w in status["workers"])
                and self._listening()
            ):
                return status
            time.sleep(0.1)
        raise TimeoutError(f"cluster not ready in {timeout} s: {status}; logs in {self.log_dir}")

    def _listening(self) -> bool:
        for i, proc in enumerate(self.gateways):
            if proc is None:
                continue
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.ws_ports[i])) != 0:
                    return False
        return True

    def _check_alive(self) -> None:
        for name, proc in (
            [("register", self.register)]
            + [(f"gateway{i}", p) for i, p in enumerate(self.gateways)]
            + [(f"worker{i}", p) for i, p in enumerate(self.workers)]
        ):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; logs in {self.log_dir}")

    def wait_log(self, name: str, text: str, timeout: float = 3 * TIMEOUT) -> None:
        """Until the latest log of process ``name`` holds ``text`` (a fact, not a delay)."""
        deadline = time.monotonic() + timeout
        path = self.log_paths[name]
        while text not in path.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"{name} never logged {text!r}"
            time.sleep(0.05)

    def gateway_id(self, i: int) -> str:
        """The id under which gateway ``i`` is in the register's table."""
        proc = self.gateways[i]
        status = self.status() or {}
        for entry in status.get("gateways", []):
            if proc is not None and entry.get("pid") == proc.pid:
                return str(entry["id"])
        raise AssertionError(f"gateway {i} is not in the register's table")

    def logs(self) -> str:
        return "\n".join(
            f"== {path.name}\n{path.read_text(errors='replace')}"
            for path in sorted(self.log_dir.glob("*.log"))
        )
