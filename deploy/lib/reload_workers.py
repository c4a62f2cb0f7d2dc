"""Restart a supervisord's business workers one by one; see deploy/reload-workers."""

from __future__ import annotations

import argparse
import configparser
import json
import os
import socket
import subprocess
import sys
import time
import xmlrpc.client
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

POLL = 0.3


def log(message: str) -> None:
    print(f"reload-workers: {message}", flush=True)


def register_status() -> dict[str, Any] | None:
    """The first answer of the registers in $CHAT_REGISTER (`python -m register status`)."""
    addresses = [a.strip() for a in os.environ.get("CHAT_REGISTER", "").split(",") if a.strip()]
    for address in addresses or [None]:
        command = [sys.executable, "-m", "register", "status", "--json"]
        if address:
            command += ["--register", address]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            continue
        if run.returncode == 0:
            return json.loads(run.stdout)
    return None


def linked(status: dict[str, Any] | None, host: str, pid: int) -> bool:
    """True when worker (host, pid) is linked to every gateway the register knows,
    and every gateway counts every worker."""
    if status is None:
        return False
    gateways = len(status["gateways"])
    workers = status["workers"]
    mine = [w for w in workers if w["pid"] == pid and w["host"] == host]
    return (
        len(mine) == 1
        and mine[0]["gateways"] == gateways
        and all(g["workers"] == len(workers) for g in status["gateways"])
    )


def wait_linked(host: str, pid: int, timeout: float) -> float:
    """Seconds until the worker is linked (seen twice, a heartbeat apart); raise on timeout."""
    start = time.monotonic()
    confirmed_at = None
    while time.monotonic() - start < timeout:
        if linked(register_status(), host, pid):
            if confirmed_at is None:
                confirmed_at = time.monotonic()
            elif time.monotonic() - confirmed_at >= 1.1:  # the gateways beat once since
                return time.monotonic() - start
        else:
            confirmed_at = None
        time.sleep(POLL)
    raise TimeoutError(f"worker pid {pid} not linked to every gateway within {timeout:.0f} s")


def supervisor_rpc(login: str) -> Any:
    """supervisord's ``supervisor.*`` XML-RPC interface, through the control socket and
    login that deploy/run wrote into ``login`` (supervisorctl's configuration)."""
    config = configparser.RawConfigParser()
    if not config.read(login):
        raise OSError(f"cannot read {login}")
    ctl = config["supervisorctl"]
    transport = SupervisorTransport(ctl.get("username"), ctl.get("password"), ctl["serverurl"])
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/reload-workers", description=__doc__)
    parser.add_argument(
        "--login",
        required=True,
        metavar="FILE",
        help="the control socket's login that deploy/run wrote (RUN_DIR/ROLE.login)",
    )
    parser.add_argument(
        "--group",
        default="worker",
        help="supervisor group of the workers (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60,
        metavar="S",
        help="seconds for each worker to link again (default: %(default)g)",
    )
    args = parser.parse_args(argv)
    try:
        rpc = supervisor_rpc(args.login)
        procs = [p for p in rpc.getAllProcessInfo() if p["group"] == args.group]
    except (OSError, KeyError, xmlrpc.client.ProtocolError) as exc:
        log(f"cannot reach supervisord with {args.login}: {exc}")
        return 1
    if not procs:
        log(f"no program group {args.group!r} in this supervisord")
        return 1
    host = socket.gethostname()
    started = time.monotonic()
    for info in sorted(procs, key=lambda p: p["name"]):
        name = f"{info['group']}:{info['name']}"
        old = info["pid"]
        status = register_status()
        if status is None:
            log("no register answers: not restarting anything (clients would wait)")
            return 1
        others = [w for w in status["workers"] if not (w["pid"] == old and w["host"] == host)]
        if not any(w["gateways"] == len(status["gateways"]) for w in others):
            log(f"warning: no other worker is linked to every gateway; events wait for {name}")
        t0 = time.monotonic()
        if info["statename"] == "RUNNING":
            rpc.stopProcess(name, True)  # waits: the worker drains, acknowledges, exits
        stopped = time.monotonic() - t0
        try:
            rpc.startProcess(name, True)
        except xmlrpc.client.Fault as exc:
            log(f"{name} did not start: {exc.faultString}")
            return 1
        pid = rpc.getProcessInfo(name)["pid"]
        try:
            took = wait_linked(host, pid, args.timeout)
        except TimeoutError as exc:
            log(f"{name}: {exc}; stopping the reload here")
            return 1
        log(f"{name} pid {old} -> {pid}: stopped in {stopped:.1f} s, linked after {took:.1f} s")
    log(f"{len(procs)} worker(s) reloaded in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
