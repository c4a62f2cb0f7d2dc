"""Every operator mistake is one line on stderr that says what is wrong, and an exit code.

Each case runs a program as a subprocess, the way an operator types it, and checks the
exit code (2 for a usage error, 1 for anything else), that stderr is exactly one line
naming the problem, and that no traceback is printed. Each runs with a fresh
CHAT_STATE_DIR holding a cluster key (nothing is written to the real home). Busy ports
are held by a plain listening socket on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chatcluster import keys as curve
from register.client import ENV_REGISTER
from tests.cluster import ROOT, free_port

USAGE, FAILED = 2, 1

APPS = {
    "opapp_raises": 'import os\n\n\nraise RuntimeError("boom")\n',
    "opapp_needs": "import no_such_dependency_xyz  # noqa\n",
    "opapp_syntax": "def on_message(:\n",
    "opapp_empty": "VALUE = 1\n",
}


@dataclass(frozen=True)
class Case:
    """``argv`` after ``python -m``; ``{busy}``, ``{free}`` and ``{tmp}`` are filled in."""

    id: str
    argv: list[str]
    code: int
    expect: list[str]
    """substrings of the one line"""
    env: dict[str, str] = field(default_factory=dict)
    key: bool = True
    """whether the state folder holds the default cluster key"""


GW = ["gateway", "--listen", "127.0.0.1:{free}"]

CASES = [
    # --app
    Case(
        "app-raises-on-import",
        ["businessworker", "--app", "opapp_raises"],
        FAILED,
        ["--app opapp_raises: importing it raised RuntimeError: boom (at {tmp}/opapp_raises.py:4)"],
    ),
    Case(
        "app-missing",
        ["businessworker", "--app", "no_such_app_xyz"],
        FAILED,
        ["--app no_such_app_xyz: no module named 'no_such_app_xyz'", "PYTHONPATH"],
    ),
    Case(
        "app-missing-dependency",
        ["businessworker", "--app", "opapp_needs"],
        FAILED,
        [
            "raised ModuleNotFoundError: No module named 'no_such_dependency_xyz'",
            "opapp_needs.py:1",
        ],
    ),
    Case(
        "app-syntax-error",
        ["businessworker", "--app", "opapp_syntax"],
        FAILED,
        ["--app opapp_syntax: importing it raised SyntaxError", "opapp_syntax.py:1"],
    ),
    Case(
        "app-without-callbacks",
        ["businessworker", "--app", "opapp_empty"],
        FAILED,
        ["--app opapp_empty: module opapp_empty defines none of on_worker_start"],
    ),
    Case(
        "app-given-as-a-file",
        ["businessworker", "--app", "opapp_empty.py"],
        USAGE,
        ["give a module name, not a file: --app opapp_empty"],
    ),
    Case(
        "app-not-given", ["businessworker"], USAGE, ["the following arguments are required: --app"]
    ),
    # the cluster key
    Case(
        "key-file-missing",
        ["register", "--bind", "tcp://127.0.0.1:{free}", "--curve-key", "{tmp}/nope.key_secret"],
        FAILED,
        ["cluster key {tmp}/nope.key_secret: no such file", "python -m register keys"],
    ),
    Case(
        "key-file-malformed",
        ["register", "--bind", "tcp://127.0.0.1:{free}", "--curve-key", "{tmp}/garbage"],
        FAILED,
        ["cluster key {tmp}/garbage is not a CURVE secret key file"],
    ),
    Case(
        "key-file-malformed-in-the-environment",
        ["businessworker", "--app", "businessworker.chat"],
        FAILED,
        ["cluster key {tmp}/garbage is not a CURVE secret key file"],
        env={curve.ENV_KEY: "{tmp}/garbage"},
    ),
    Case(
        "key-file-is-a-directory",
        [*GW, "--curve-key", "{tmp}"],
        FAILED,
        ["cluster key {tmp}: Is a directory"],
    ),
    Case(
        "status-without-any-key",
        ["register", "status", "--register", "tcp://127.0.0.1:{free}"],
        FAILED,
        ["no cluster key at", "--curve-key"],
        key=False,
    ),
    Case(
        "key-and-insecure",
        [*GW, "--curve-key", "{tmp}/garbage", "--insecure"],
        USAGE,
        ["give --curve-key or --insecure, not both"],
    ),
    # busy ports
    Case(
        "register-bind-busy",
        ["register", "--bind", "tcp://127.0.0.1:{busy}"],
        FAILED,
        ["cannot bind tcp://127.0.0.1:{busy}: Address already in use", "another --bind"],
    ),
    Case(
        "gateway-listen-busy",
        ["gateway", "--listen", "127.0.0.1:{busy}"],
        FAILED,
        ["cannot listen on 127.0.0.1:{busy}: Address already in use", "another --listen"],
    ),
    Case(
        "gateway-internal-busy",
        [*GW, "--internal", "tcp://127.0.0.1:{busy}"],
        FAILED,
        ["cannot bind the internal address tcp://127.0.0.1:{busy}: Address already in use"],
    ),
    Case(
        "web-port-busy",
        ["web", "--host", "127.0.0.1", "--port", "{busy}"],
        FAILED,
        ["cannot listen on 127.0.0.1:{busy}: Address already in use", "another --port"],
    ),
    # addresses
    Case(
        "listen-port-not-a-number",
        ["gateway", "--listen", "127.0.0.1:notaport"],
        USAGE,
        ["argument --listen: '127.0.0.1:notaport': 'notaport' is not a port number"],
    ),
    Case(
        "listen-without-port",
        ["gateway", "--listen", "127.0.0.1"],
        USAGE,
        ["argument --listen: '127.0.0.1' is not HOST:PORT"],
    ),
    Case(
        "register-address-garbage",
        [*GW, "--register", "bogus"],
        USAGE,
        ["argument --register: 'bogus' is not a ZeroMQ address: give tcp://HOST:PORT"],
    ),
    Case(
        "register-address-without-port",
        ["businessworker", "--app", "businessworker.chat", "--register", "tcp://127.0.0.1"],
        USAGE,
        ["argument --register: 'tcp://127.0.0.1' has no port"],
    ),
    Case(
        "register-address-any-port",
        [*GW, "--register", "tcp://127.0.0.1:*"],
        USAGE,
        ["'*' (any port) can be bound, not dialled"],
    ),
    Case(
        "CHAT_REGISTER-garbage",
        ["businessworker", "--app", "businessworker.chat"],
        USAGE,
        [f"${ENV_REGISTER}: 'garbage' is not a ZeroMQ address"],
        env={ENV_REGISTER: "tcp://127.0.0.1:1236,garbage"},
    ),
    Case(
        "internal-address-garbage",
        [*GW, "--internal", "bogus"],
        USAGE,
        ["argument --internal: 'bogus' is not a ZeroMQ address"],
    ),
    Case(
        "internal-on-every-interface-without-advertise",
        [*GW, "--internal", "tcp://0.0.0.0:*"],
        USAGE,
        ["--internal tcp://0.0.0.0:* binds every interface: say with --advertise"],
    ),
    Case(
        "advertise-garbage",
        [*GW, "--advertise", "10.0.0.2:7300"],
        USAGE,
        ["argument --advertise: '10.0.0.2:7300' is not a ZeroMQ address"],
    ),
    Case(
        "register-bind-garbage",
        ["register", "--bind", "127.0.0.1:1236"],
        USAGE,
        ["argument --bind: '127.0.0.1:1236' is not a ZeroMQ address"],
    ),
    Case(
        "register-bind-port-out-of-range",
        ["register", "--bind", "tcp://127.0.0.1:99999"],
        USAGE,
        ["'99999' is not a port number (1-65535)"],
    ),
    Case(
        "register-bind-address-of-no-interface",  # TEST-NET-1: never this machine's
        ["register", "--bind", "tcp://192.0.2.1:{free}"],
        FAILED,
        ["cannot bind tcp://192.0.2.1:{free}: Cannot assign requested address"],
    ),
    Case(
        "web-port-out-of-range",
        ["web", "--host", "127.0.0.1", "--port", "-5"],
        USAGE,
        ["argument --port: port -5 is not between 0 and 65535"],
    ),
    Case(
        "web-ws-url-not-ws",
        ["web", "--host", "127.0.0.1", "--port", "0", "--ws-url", "http://x:7272"],
        USAGE,
        ["--ws-url must start with ws:// or wss://"],
    ),
    # TLS
    Case(
        "tls-cert-missing",
        [*GW, "--tls-cert", "{tmp}/cert.pem"],
        FAILED,
        ["--tls-cert {tmp}/cert.pem: no such file"],
    ),
    Case(
        "tls-cert-not-a-certificate",
        [*GW, "--tls-cert", "{tmp}/garbage"],
        FAILED,
        ["--tls-cert {tmp}/garbage: cannot load them", "PEM certificate chain"],
    ),
    Case(
        "tls-key-without-cert",
        [*GW, "--tls-key", "{tmp}/garbage"],
        USAGE,
        ["--tls-key needs --tls-cert"],
    ),
    # sizes, counts, seconds, levels
    *(
        Case(f"{option}-{value}", [*GW, f"--{option}", value], USAGE, [f"argument --{option}: "])
        for option, value in [
            ("max-message-size", "0"),
            ("max-send-buffer", "-1"),
            ("max-waiting", "0"),
            ("drain-batch", "-5"),
            ("drain-batch", "many"),
            ("drain-time", "0"),
            ("drain-time", "-1"),
            ("drain-time", "inf"),
        ]
    ),
    *(
        Case(
            f"log-level-bogus-{program}",
            [*argv, "--log-level", "bogus"],
            USAGE,
            ["argument --log-level: invalid choice: 'bogus'"],
        )
        for program, argv in [
            ("gateway", GW),
            ("register", ["register"]),
            ("status", ["register", "status"]),
            ("businessworker", ["businessworker", "--app", "businessworker.chat"]),
        ]
    ),
    # register subcommands
    Case(
        "register-keys-out-unwritable",
        ["register", "keys", "--out", "{tmp}/garbage/keys"],
        FAILED,
        ["cannot write keys into {tmp}/garbage/keys: Not a directory"],
    ),
    # --metrics (#15): loopback unless --metrics-public; a busy port; a bad value
    Case(
        "gateway-metrics-not-loopback",
        [*GW, "--metrics", "0.0.0.0:{free}"],
        USAGE,
        ["--metrics 0.0.0.0:{free} is not a loopback address", "add --metrics-public"],
    ),
    Case(
        "register-metrics-busy",
        ["register", "--bind", "tcp://127.0.0.1:{free}", "--metrics", "127.0.0.1:{busy}"],
        FAILED,
        ["cannot serve metrics on 127.0.0.1:{busy}: Address already in use", "another --metrics"],
    ),
    Case(
        "worker-metrics-not-host-port",
        ["businessworker", "--app", "businessworker.chat", "--metrics", "1237"],
        USAGE,
        ["argument --metrics: '1237' is not HOST:PORT"],
    ),
    Case(
        "web-metrics-url-not-http",
        ["web", "--port", "0", "--metrics-url", "tcp://127.0.0.1:1237"],
        USAGE,
        ["--metrics-url must start with http:// or https://"],
    ),
    Case(
        "register-keys-out-holds-a-key",
        ["register", "keys", "--out", "{tmp}/state"],
        FAILED,
        ["{tmp}/state/cluster.key_secret exists", "remove it first"],
    ),
    Case(
        "register-status-no-answer",
        ["register", "status", "--register", "tcp://127.0.0.1:{free}", "--timeout", "0.3"],
        FAILED,
        ["no answer from tcp://127.0.0.1:{free} within 0.3 s", "is the register running"],
    ),
    Case(
        "register-option-of-another-subcommand",
        ["register", "--json"],
        USAGE,
        ["unrecognized arguments: --json: it belongs to `python -m register status`"],
    ),
    Case(
        "register-status-option-of-run",
        ["register", "status", "--bind", "tcp://127.0.0.1:1236"],
        USAGE,
        [
            "unrecognized arguments: --bind tcp://127.0.0.1:1236: "
            "they belong to `python -m register run`"
        ],
    ),
]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by a plain listening socket (no SO_REUSEPORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run_case(
    case: Case, tmp: Path, busy: int, *extra: str
) -> tuple[subprocess.CompletedProcess[str], Callable[[str], str]]:
    """Run ``case`` in ``tmp``; return the result and the placeholder filler it used."""
    for name, text in APPS.items():
        (tmp / f"{name}.py").write_text(text)
    (tmp / "garbage").write_text("not a key, not a certificate\n")
    state = tmp / "state"
    if case.key:
        curve.ensure(state / curve.KEY_NAME)
    free = free_port()

    def fill(text: str) -> str:
        return text.format(busy=busy, free=free, tmp=tmp)

    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(
        {curve.ENV_STATE: str(state), "PYTHONPATH": f"{tmp}:{ROOT}"},
        **{k: fill(v) for k, v in case.env.items()},
    )
    return subprocess.run(
        [sys.executable, "-m", *map(fill, case.argv), *extra],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    ), fill


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_one_line_and_an_exit_code(case: Case, tmp_path: Path, busy_port: int) -> None:
    run, fill = run_case(case, tmp_path, busy_port)
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    for text in case.expect:
        assert fill(text) in lines[0], lines[0]
    assert run.returncode == case.code, run.stderr


def test_debug_shows_the_traceback(tmp_path: Path, busy_port: int) -> None:
    """--log-level debug keeps the traceback of an operator error, then the one line."""
    case = next(c for c in CASES if c.id == "register-bind-busy")
    run, fill = run_case(case, tmp_path, busy_port, "--log-level", "debug")
    assert run.returncode == FAILED
    assert "Traceback" in run.stderr and "zmq.error.ZMQError" in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1].startswith(
        fill("register: cannot bind tcp://127.0.0.1:{busy}")
    )
