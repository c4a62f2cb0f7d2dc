"""One control path: `make run`'s foreground `deploy/run all` and the tools that find it.

A supervisord started exactly as `make run` starts it (``CHAT_FOREGROUND=1 deploy/run
all``, here with free loopback ports and its own CHAT_RUN_DIR): `deploy/ctl status`,
`deploy/status` and `deploy/reload-workers`, all given no role, find it; a second start
is refused; nothing it prints at start is a warning (supervisor's CRIT lines about root
and an unauthenticated control socket are gone); SIGTERM stops everything and frees
every port.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import free_port
from tests.deploy.supervised import DEPLOY, Supervised, clean_env, local_status, wait_mesh

pytestmark = pytest.mark.deploy

GATEWAYS, WORKERS = 2, 2


class Foreground:
    """``CHAT_FOREGROUND=1 deploy/run all`` (the Makefile's `run` recipe) on free ports."""

    def __init__(self) -> None:
        self.register = f"tcp://127.0.0.1:{free_port()}"
        self.port = free_port()
        self.web_port = free_port()
        self.metrics_port = free_port()
        self.sup = Supervised(
            "all",
            {
                "CHAT_REGISTER": self.register,
                "CHAT_REGISTER_BIND": self.register,
                "CHAT_LISTEN": f"127.0.0.1:{self.port}",
                "CHAT_GATEWAYS": GATEWAYS,
                "CHAT_WORKERS": WORKERS,
                "CHAT_WEB_PORT": self.web_port,
                "CHAT_WEB_ARGS": "--host 127.0.0.1",
                "CHAT_REGISTER_METRICS": f"127.0.0.1:{self.metrics_port}",
            },
        )
        self.pids: set[int] = set()

    def start(self) -> None:
        self.sup.start(str(DEPLOY / "run"), "all", CHAT_FOREGROUND="1")
        self.sup.wait_running()
        wait_mesh(lambda: local_status(self.register, self.sup.keys), GATEWAYS, WORKERS)

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A deploy command with the same settings, as an operator types it."""
        return self.sup.run(str(DEPLOY / command[0]), *command[1:], timeout=timeout)

    def program_pids(self) -> set[int]:
        return {info["pid"] for info in self.sup.infos().values()}

    def ports(self) -> list[int]:
        return [int(self.register.rsplit(":", 1)[1]), self.port, self.web_port, self.metrics_port]


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused command prints on stderr (and no traceback)."""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    return lines[0]


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` (SO_REUSEADDR: connections the server closed, such as
    the metrics scrapes', linger in TIME_WAIT, and those are no listener)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def machine() -> Iterator[Foreground]:
    fg = Foreground()
    fg.start()
    pids = fg.program_pids()
    try:
        yield fg
    finally:
        pids |= fg.program_pids()
        fg.sup.stop()
    # SIGTERM stopped every program cleanly: none left, every port free.
    output = fg.sup.output()
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"programs left running: {pids}"
        time.sleep(0.1)
    assert all(port_free(p) for p in fg.ports()), fg.ports()
    assert "SIGKILL" not in output and "CRIT" not in output, output
    fg.sup.cleanup()


def test_make_run_serves_the_clusters_metrics_and_health(machine: Foreground) -> None:
    """The register's endpoint (CHAT_REGISTER_METRICS): every program's figures, /health 200."""
    base = f"http://127.0.0.1:{machine.metrics_port}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as answer:
        assert answer.status == 200
        assert answer.read().decode().strip() == f"ok: {GATEWAYS} gateways, {WORKERS} workers"
    deadline = time.monotonic() + 10
    while True:  # each member's figures come with its next heartbeat
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        roles = [
            s.labels["role"]
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "process_up_seconds"
        ]
        if sorted(roles) == sorted(["register"] + ["gateway"] * GATEWAYS + ["worker"] * WORKERS):
            break
        assert time.monotonic() < deadline, roles
        time.sleep(0.1)


def test_nothing_at_start_is_a_warning(machine: Foreground) -> None:
    output = machine.sup.output()
    # every program's log is on supervisord's stdout, as on `make run`'s terminal
    assert "register listening" in output and "gateway listening" in output, output
    assert output.count("worker started") == WORKERS, output
    assert f"on http://127.0.0.1:{machine.web_port}/" in output, output
    for bad in ("CRIT", "WARN", "level=WARNING", "level=ERROR", "Traceback"):
        assert bad not in output, output
    # supervisord's own log has no CRIT either: not root without user=, not a socket
    # without a login
    log = machine.sup.supervisord_log()
    assert "CRIT" not in log, log
    assert machine.sup.login.stat().st_mode & 0o777 == 0o600


def test_ctl_status_finds_the_running_supervisord(machine: Foreground) -> None:
    run = machine.run("ctl", "status")
    assert run.returncode == 0, run.stderr
    running = re.findall(r"^(\S+)\s+RUNNING", run.stdout, re.M)
    assert sorted(running) == sorted(machine.sup.infos()), run.stdout
    # the role may still be given
    assert machine.run("ctl", "all", "status").returncode == 0


def test_ctl_for_a_role_that_does_not_run_says_what_does(machine: Foreground) -> None:
    run = machine.run("ctl", "worker", "status")
    assert run.returncode == 1
    line = one_line(run)
    assert "no supervisord for worker runs from" in line and "running: all" in line, line


def test_deploy_status_answers(machine: Foreground) -> None:
    run = machine.run("status")
    assert run.returncode == 0, run.stderr
    assert f"{GATEWAYS} gateway(s)" in run.stdout and f"{WORKERS} worker(s)" in run.stdout


def test_reload_workers_finds_the_running_supervisord(machine: Foreground) -> None:
    before = {n: i["pid"] for n, i in machine.sup.infos().items() if n.startswith("worker:")}
    run = machine.run("reload-workers", timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{WORKERS} worker(s) reloaded" in run.stdout, run.stdout
    after = {n: i["pid"] for n, i in machine.sup.infos().items() if n.startswith("worker:")}
    assert sorted(after) == sorted(before)
    assert not set(after.values()) & set(before.values())  # each one restarted


@pytest.mark.parametrize("role", ["all", "gateway", "register,worker"])
def test_a_second_start_is_refused(machine: Foreground, role: str) -> None:
    login = machine.sup.login.read_text()
    run = machine.sup.run(str(DEPLOY / "run"), role, timeout=30)
    assert run.returncode == 1
    line = one_line(run)
    pid = machine.sup.proc.pid if machine.sup.proc else None  # deploy/run execs supervisord
    assert f"already running (pid {pid}," in line, line
    assert line.startswith(f"deploy: {role} already running"), line
    # the running one is untouched: same login, still answering
    assert machine.sup.login.read_text() == login
    assert machine.run("ctl", "status").returncode == 0


def test_ctl_and_reload_without_a_role_when_none_or_several_run(tmp_path: Path) -> None:
    empty = {"CHAT_RUN_DIR": str(tmp_path / "empty")}
    for command in (["ctl", "status"], ["reload-workers"]):
        run = subprocess.run(
            [str(DEPLOY / command[0]), *command[1:]],
            env=clean_env(**empty),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 1, run.stderr
        line = one_line(run)
        assert "runs from" in line and "start one with make run" in line, line

    # Two supervisords of one run directory (one role each): the role must be given.
    shared = str(tmp_path / "run")
    register = f"tcp://127.0.0.1:{free_port()}"
    settings: dict[str, Any] = {
        "CHAT_RUN_DIR": shared,
        "CHAT_REGISTER_BIND": register,
        "CHAT_WEB_PORT": 0,
        "CHAT_WEB_ARGS": "--host 127.0.0.1",
        "CHAT_STATE_DIR": str(tmp_path / "state"),  # one key for both
    }
    hosts = [Supervised("register", settings), Supervised("web", settings)]
    try:
        for host in hosts:
            host.start()
            host.wait_running()
        run = hosts[0].run(str(DEPLOY / "ctl"), "status")
        assert run.returncode == 2
        line = one_line(run)
        assert "several supervisords run from" in line and "(register, web)" in line, line
        run = hosts[0].run(str(DEPLOY / "ctl"), "web", "status")
        assert run.returncode == 0 and "web" in run.stdout, run.stderr
        run = hosts[0].run(str(DEPLOY / "reload-workers"))
        assert run.returncode == 1
        assert "no supervisord with workers runs from" in one_line(run)
        # different roles may share a run directory; the same role may not
        assert "register already running" in one_line(hosts[0].run(str(DEPLOY / "run"), "all"))
    finally:
        logs = [host.stop() for host in hosts]
    for host, log in zip(hosts, logs, strict=True):
        assert "CRIT" not in log, log
        host.assert_stopped_cleanly(log)
        host.cleanup()
    assert not list(Path(shared).glob("*.pid"))
    assert os.listdir(shared)  # the logins stay (rewritten at the next start)
