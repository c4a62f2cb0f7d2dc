"""A supervisord started the way an operator does: ``deploy/run ROLE -n`` with a settings file.

Each ``Supervised`` is one host's (or one role's) supervisord. Its settings go into a
small file (``CHAT_CONFIG``), exactly as on a real machine; the test's own environment
contributes no ``CHAT_*`` variable. It may run inside a network namespace (``netns``).
The control socket is a path on the filesystem, so the test talks XML-RPC to it from
the root namespace.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from businessworker.testing import TIMEOUT
from chatcluster import keys as curve
from tests.cluster import ROOT, free_port, register_status

DEPLOY = ROOT / "deploy"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any CHAT_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def role_name(role: str) -> str:
    return "all" if role == "all" else role.replace(",", "-")


class Supervised:
    """``deploy/run ROLE -n`` with ``settings``; start(), wait_ready(), rpc, stop()."""

    def __init__(
        self,
        role: str,
        settings: dict[str, str | int],
        *,
        base: Path | None = None,
        netns: str | None = None,
        label: str | None = None,
    ) -> None:
        self.role = role
        self.netns = netns
        self.label = label or role_name(role)
        # Short paths: the control socket must stay under ~100 characters.
        self.dir = Path(tempfile.mkdtemp(prefix=f"cd-{self.label}-", dir=base or "/tmp"))
        self.settings = {
            "CHAT_RUN_DIR": str(self.dir / "run"),
            "CHAT_LOG_DIR": str(self.dir / "log"),
            # the default cluster key, made by the first program: never the real home's
            curve.ENV_STATE: str(self.dir / "state"),
            # the register's metrics (deploy/cluster.env: 127.0.0.1:1237) on a free port
            "CHAT_REGISTER_METRICS": f"127.0.0.1:{free_port()}",
            **{k: str(v) for k, v in settings.items()},
        }
        self.config = self.dir / "chat.env"
        self.config.write_text("".join(f"{k}='{v}'\n" for k, v in self.settings.items()))
        run_dir = Path(self.settings["CHAT_RUN_DIR"])
        self.socket = run_dir / f"{role_name(role)}.sock"
        self.login = run_dir / f"{role_name(role)}.login"
        """the control socket's login, which deploy/run writes at each start"""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def keys(self) -> curve.Keys | None:
        """The cluster key its programs run with (None before the first made it)."""
        path = Path(
            self.settings.get(curve.ENV_KEY)
            or Path(self.settings[curve.ENV_STATE]) / curve.KEY_NAME
        )
        return curve.load(path) if path.exists() else None

    # Commands, optionally inside the namespace

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def env(self) -> dict[str, str]:
        return clean_env(CHAT_CONFIG=str(self.config))

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``command`` with this host's settings (and in its namespace)."""
        return subprocess.run(
            [*self.prefix(), *command],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # Lifecycle

    def start(self, *command: str, **env: str) -> Supervised:
        """Run ``command`` (default ``deploy/run ROLE -n``) with the settings and ``env``;
        return once the control socket exists."""
        out = open(self.dir / "supervisord.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix(), *(command or (str(DEPLOY / "run"), self.role, "-n"))],
            cwd=ROOT,
            env={**self.env(), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited: {self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no control socket {self.socket}: {self.output()}")
            time.sleep(0.05)
        return self

    @property
    def rpc(self) -> Any:
        """supervisord's XML-RPC interface (``supervisor.*``), over the control socket
        with the login deploy/run made. A new connection each time, so threads never
        share one."""
        config = configparser.RawConfigParser()
        config.read(self.login)
        ctl = config["supervisorctl"]
        proxy = xmlrpc.client.ServerProxy(
            "http://127.0.0.1",
            transport=SupervisorTransport(ctl["username"], ctl["password"], ctl["serverurl"]),
        )
        return proxy.supervisor

    def infos(self) -> dict[str, dict[str, Any]]:
        """Every process by its full name (``gateway:gateway0``, ``register``)."""
        out = {}
        for info in self.rpc.getAllProcessInfo():
            group, name = info["group"], info["name"]
            out[name if group == name else f"{group}:{name}"] = info
        return out

    def pid(self, name: str) -> int:
        return self.infos()[name]["pid"]

    def wait_running(self, timeout: float = 2 * TIMEOUT) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            infos = self.infos()
            if all(i["statename"] == "RUNNING" for i in infos.values()):
                return infos
            if time.monotonic() > deadline:
                states = {n: i["statename"] for n, i in infos.items()}
                raise TimeoutError(f"not all RUNNING: {states}\n{self.logs()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> str:
        """SIGTERM supervisord (it stops every program cleanly); return its log.

        Never SIGKILL supervisord: its children would survive it and keep their ports.
        """
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        self.proc = None
        return self.supervisord_log()

    def cleanup(self) -> None:
        """Remove settings, sockets and logs (after a passing test; a failure keeps them)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    # Logs

    def output(self) -> str:
        path = self.dir / "supervisord.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def supervisord_log(self) -> str:
        path = self.dir / "log" / f"supervisord-{role_name(self.role)}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, pattern: str = "*.log") -> str:
        return "\n".join(
            f"== {path.name}\n{path.read_text(errors='replace')}"
            for path in sorted((self.dir / "log").glob(pattern))
        )

    def assert_stopped_cleanly(self, log: str, killed: int = 0) -> None:
        """Every program stopped on supervisor's signal with status 0; none needed SIGKILL,
        except the ``killed`` the test SIGKILLed itself."""
        assert "with SIGKILL" not in log, log  # supervisor's own kill after stopwaitsecs
        stopped = re.findall(r"stopped: (\S+) \((.*?)\)", log)
        assert stopped, log
        bad = [(name, why) for name, why in stopped if why != "exit status 0"]
        assert not bad, f"{bad}\n{log}"
        assert log.count("terminated by SIGKILL") == killed, log


def status_in(host: Supervised) -> dict[str, Any] | None:
    """``deploy/status --json`` run on ``host`` (inside its namespace, with its settings)."""
    run = host.run(str(DEPLOY / "status"), "--json")
    return json.loads(run.stdout) if run.returncode == 0 else None


def local_status(register: str, keys: curve.Keys | None) -> dict[str, Any] | None:
    """The register's table, asked from this process with the cluster key; None (not
    asked) while the first program has not made the key yet: a question without it
    would be refused, and logged by the register as a stranger's."""
    if keys is None:
        return None
    return register_status(register, timeout=2.0, keys=keys)


def mesh(status: dict[str, Any] | None, gateways: int, workers: int) -> bool:
    """Every gateway linked to every worker, and the counts as expected."""
    return (
        status is not None
        and len(status["gateways"]) == gateways
        and len(status["workers"]) == workers
        and all(g["workers"] == workers for g in status["gateways"])
        and all(w["gateways"] == gateways for w in status["workers"])
    )


def wait_mesh(
    status: Any, gateways: int, workers: int, timeout: float = 2 * TIMEOUT, what: str = ""
) -> dict[str, Any]:
    """Poll ``status()`` until ``mesh`` holds; return the status."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = status()
        if mesh(last, gateways, workers):
            return last
        time.sleep(0.2)
    raise TimeoutError(f"no {gateways}x{workers} mesh in {timeout} s: {last} {what}")
