"""The supervisor configurations and the launcher, without starting a cluster (a few seconds).

`make run` is `CHAT_FOREGROUND=1 deploy/run all`, whose configuration (settings from
deploy/cluster.env alone) sends every log to stdout; the role configurations take their
counts from the settings; deploy/bin/program turns the settings into the programs'
options; deploy/run refuses bad settings before starting.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT
from tests.deploy.supervised import DEPLOY, clean_env

pytestmark = pytest.mark.deploy

PARSE = """
import json, sys
from supervisor.options import ServerOptions
o = ServerOptions()
o.realize(args=["-c", sys.argv[1]])
print(json.dumps({
    "nodaemon": o.nodaemon, "minfds": o.minfds, "logfile": o.logfile,
    "loglevel": o.loglevel, "uid": o.uid, "warnings": o.parse_warnings,
    "socket": o.server_configs[0]["file"],
    "username": o.server_configs[0]["username"],
    "password": o.server_configs[0]["password"],
    "programs": {p.name: {
        "group": g.name, "command": p.command, "log": p.stdout_logfile,
        "stopwaitsecs": p.stopwaitsecs, "stopasgroup": p.stopasgroup,
        "killasgroup": p.killasgroup, "stopsignal": int(p.stopsignal),
        "environment": p.environment, "directory": p.directory,
        "autorestart": str(p.autorestart),
    } for g in o.process_group_configs for p in g.process_configs},
}))
"""


def parse(conf: Path, **env: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", PARSE, str(conf)],
        cwd="/",
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def check_program_basics(programs: dict) -> None:
    for name, p in programs.items():
        assert p["command"].startswith(f"{DEPLOY}/supervisor/../bin/program "), name
        assert p["stopasgroup"] and p["killasgroup"], name
        assert p["stopsignal"] == 15, name
        assert p["environment"]["PYTHONUNBUFFERED"] == "1", name
        assert Path(p["directory"]).resolve() == ROOT, name


def test_make_run_is_deploy_run_all_in_the_foreground() -> None:
    run = subprocess.run(
        ["make", "-s", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "CHAT_FOREGROUND=1 deploy/run all"


# What deploy/run does before it starts supervisord, then supervisor's own parsing.
LAUNCH = """
. deploy/lib/config.sh
chat_load_config
chat_roles all
mkdir -p "$CHAT_RUN_DIR" "$CHAT_LOG_DIR"
chat_write_login
exec "$CHAT_PYTHON" -c "$1" deploy/supervisor/roles.conf
"""


def test_make_run_conf_takes_only_the_default_settings(tmp_path: Path) -> None:
    run = subprocess.run(
        ["bash", "-c", LAUNCH, "launch", PARSE],
        cwd=ROOT,
        env=clean_env(
            CHAT_FOREGROUND="1",
            CHAT_RUN_DIR=str(tmp_path / "run"),
            CHAT_LOG_DIR=str(tmp_path / "logs"),
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    conf = json.loads(run.stdout)
    programs = conf["programs"]
    assert sorted(programs) == [
        "gateway0",
        "gateway1",
        "register",
        "web",
        "worker0",
        "worker1",
        "worker2",
        "worker3",
    ]
    check_program_basics(programs)
    assert {p["log"] for p in programs.values()} == {"/dev/stdout"}
    assert conf["nodaemon"] is True
    assert conf["loglevel"] == 30  # warn: only what needs attention on stdout
    assert conf["warnings"] == []
    assert conf["minfds"] <= 20000  # more and supervisord refuses to start here
    assert conf["socket"] == f"{tmp_path}/run/all.sock"
    # No CRIT at start: supervisord runs as the account that starts it ...
    assert conf["uid"] == os.getuid()
    # ... and its control socket has a login, made at this start, readable by it alone.
    login = tmp_path / "run" / "all.login"
    assert login.stat().st_mode & 0o777 == 0o600
    assert conf["username"] == "chat" and len(conf["password"]) == 32
    assert f"password={conf['password']}" in login.read_text()
    assert f"serverurl=unix://{tmp_path}/run/all.sock" in login.read_text()


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("register", ["register"]),
        ("gateway", ["gateway0", "gateway1", "gateway2"]),
        ("worker", ["worker0", "worker1", "worker2", "worker3", "worker4"]),
        ("register,gateway", ["gateway0", "gateway1", "gateway2", "register"]),
        (
            "all",
            ["gateway0", "gateway1", "gateway2", "register", "web"]
            + [f"worker{i}" for i in range(5)],
        ),
    ],
)
def test_role_confs_take_counts_and_log_dir_from_the_settings(
    role: str, expected: list[str], tmp_path: Path
) -> None:
    name = "all" if role == "all" else role.replace(",", "-")
    files = " ".join(
        f"{r}.ini"
        for r in (["register", "gateway", "worker", "web"] if role == "all" else role.split(","))
    )
    # The variables deploy/run exports (deploy/lib/config.sh).
    conf = parse(
        DEPLOY / "supervisor" / "roles.conf",
        CHAT_ROOT=str(ROOT),
        CHAT_ROLE_NAME=name,
        CHAT_ROLE_FILES=files,
        CHAT_RUN_DIR=str(tmp_path),
        CHAT_LOG_DIR=str(tmp_path),
        CHAT_USER=getpass.getuser(),
        CHAT_GATEWAYS="3",
        CHAT_WORKERS="5",
        CHAT_GATEWAY_STOPWAIT="41",
        CHAT_WORKER_STOPWAIT="42",
    )
    programs = conf["programs"]
    assert sorted(programs) == sorted(expected)
    check_program_basics(programs)
    for pname, p in programs.items():
        assert p["log"] == f"{tmp_path}/{pname}.log"
        if pname.startswith("gateway"):
            assert p["stopwaitsecs"] == 41
        if pname.startswith("worker"):
            assert p["stopwaitsecs"] == 42
    assert conf["socket"] == f"{tmp_path}/{name}.sock"
    assert conf["logfile"] == f"{tmp_path}/supervisord-{name}.log"
    assert conf["nodaemon"] is False  # deploy/run ROLE daemonizes unless given -n


def program(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY / "bin" / "program"), *args],
        env=clean_env(CHAT_PRINT="1", **env),
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_program_turns_settings_into_options(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key_secret"
    key.write_text("")
    config = tmp_path / "gateway.env"
    config.write_text(
        "CHAT_REGISTER='tcp://10.0.0.1:1236, tcp://10.0.0.9:1236'\n"
        f"CHAT_CURVE_KEY={key}\n"
        "CHAT_LISTEN=0.0.0.0:443\n"
        "CHAT_INTERNAL_BIND=0.0.0.0\n"
        "CHAT_INTERNAL_PORT=7300\n"
        "CHAT_ADVERTISE=10.0.0.2\n"
        "CHAT_GATEWAY_ARGS='--max-waiting 50'\n"
        "CHAT_APP=tests.apps.probe\n"
        "CHAT_GATEWAY_METRICS=0.0.0.0:9100\n"
        "CHAT_METRICS_PUBLIC=1\n"
    )
    run = program("gateway", "2", CHAT_CONFIG=str(config))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [
        str(ROOT / ".venv/bin/python"),
        "-m",
        "gateway",
        "--listen",
        "0.0.0.0:443",
        "--internal",
        "tcp://0.0.0.0:7302",
        "--advertise",
        "tcp://10.0.0.2:7302",
        "--register",
        "tcp://10.0.0.1:1236",
        "--register",
        "tcp://10.0.0.9:1236",
        "--curve-key",
        str(key),
        "--metrics",
        "0.0.0.0:9102",
        "--metrics-public",
        "--max-waiting",
        "50",
    ]
    # The environment wins over the file.
    run = program("worker", CHAT_CONFIG=str(config), CHAT_APP="other.app", CHAT_REGISTER="")
    worker = ["-m", "businessworker", "--app", "other.app", "--curve-key", str(key)]
    assert run.stdout.split()[1:] == worker
    # The defaults (deploy/cluster.env) are `make run`'s layout.
    assert program("register").stdout.split()[1:] == [
        "-m",
        "register",
        "--bind",
        "tcp://127.0.0.1:1236",
        "--metrics",
        "127.0.0.1:1237",
    ]
    assert program("gateway", "1").stdout.split()[1:] == [
        "-m",
        "gateway",
        "--listen",
        "0.0.0.0:7272",
        "--internal",
        "tcp://127.0.0.1:\\*",
        "--register",
        "tcp://127.0.0.1:1236",
    ]
    assert program("web").stdout.split()[1:] == ["-m", "web", "--port", "55151"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"CHAT_GATEWAYS": "0"}, "CHAT_GATEWAYS=0 must be a positive integer"),
        ({"CHAT_WORKERS": "two"}, "CHAT_WORKERS=two must be a positive integer"),
        ({"CHAT_INTERNAL_BIND": "0.0.0.0"}, "needs a concrete CHAT_INTERNAL_BIND"),
        ({"CHAT_ADVERTISE": "10.0.0.2"}, "CHAT_ADVERTISE needs a fixed CHAT_INTERNAL_PORT"),
        ({"CHAT_CURVE_KEY": "/nonexistent/cluster.key_secret"}, "cannot read it"),
        ({"CHAT_RUN_DIR": "/tmp/" + "x" * 100}, "control socket path too long"),
        ({"CHAT_CONFIG": "/nonexistent.env"}, "no such file"),
    ],
)
def test_run_refuses_bad_settings_before_starting(settings: dict, message: str) -> None:
    run = subprocess.run(
        [str(DEPLOY / "run"), "gateway", "-n"],
        env=clean_env(**settings),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert run.returncode == 2
    assert message in run.stderr


def test_run_and_ctl_explain_their_usage() -> None:
    for command, usage in (("run", "deploy/run ROLE"), ("ctl", "deploy/ctl [ROLE]")):
        run = subprocess.run([str(DEPLOY / command)], capture_output=True, text=True, timeout=10)
        assert run.returncode == 2
        assert usage in run.stderr
    run = subprocess.run([str(DEPLOY / "run"), "bogus"], capture_output=True, text=True, timeout=10)
    assert run.returncode == 2 and "unknown role 'bogus'" in run.stderr
