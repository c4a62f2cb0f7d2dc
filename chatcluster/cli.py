"""How a process of the cluster starts and reports an operator's mistake.

A mistake of the operator's (a bad option, a busy port, a missing key file, an
app that does not import) is one line on stderr and an exit code, never a
traceback: 2 for a usage error, 1 for anything else. Tracebacks are for bugs,
and for ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from chatcluster.logs import LEVELS

if TYPE_CHECKING:  # not imported at run time: the page server has no use for ZeroMQ
    import zmq

USAGE = 2
"""Exit code of a usage error (a bad option or value)."""
FAILED = 1
"""Exit code of any other operator mistake (a busy port, a missing file)."""

ZMQ_SCHEMES = ("tcp", "ipc", "inproc")
ZMQ_EXAMPLE = "tcp://HOST:PORT, e.g. tcp://127.0.0.1:1236"


class OperatorError(Exception):
    """Something the operator can fix; its message says what and how."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: what is wrong (see --help)``, exit 2.

    Subcommands made with ``add_subparsers`` are Parsers too, so theirs are one line.
    """

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {one_line(message)} (see --help)\n")
        sys.exit(USAGE)

    def add_link_timeout(self) -> None:
        """The ``--link-timeout`` of every member of the cluster (``chatcluster.links``)."""
        from chatcluster import links

        self.add_argument(
            "--link-timeout",
            type=positive_float,
            default=None,
            metavar="S",
            help=f"seconds a silent internal link is waited for before its peer is taken for "
            f"gone (default: ${links.ENV_LINK_TIMEOUT}, else {links.LINK_TIMEOUT:g})",
        )

    def add_registers(
        self, what: str = "register address, repeatable for redundant registers"
    ) -> None:
        """``--register ADDR`` (repeatable): where the cluster's register(s) are."""
        self.add_argument(
            "--register",
            action="append",
            type=zmq_address(),
            metavar="ADDR",
            help=f"{what} (default: $CHAT_REGISTER, comma-separated, else tcp://127.0.0.1:1236)",
        )

    def add_cluster_key(self, insecure_help: str) -> None:
        """``--curve-key FILE`` and ``--insecure``: how this program joins the cluster's links."""
        from chatcluster import keys

        self.add_argument(
            "--curve-key",
            metavar="FILE",
            help=f"the cluster's secret key file (default: ${keys.ENV_KEY}, else "
            f"{keys.default_file()}, made at the first start of a member)",
        )
        self.add_argument("--insecure", action="store_true", help=insecure_help)

    def check_cluster_key(self, args: argparse.Namespace) -> None:
        """A usage error for --curve-key with --insecure."""
        if args.curve_key and args.insecure:
            self.error("give --curve-key or --insecure, not both")

    def add_metrics(self, what: str) -> None:
        """``--metrics HOST:PORT`` and ``--metrics-public`` (``chatcluster.metrics``)."""
        from chatcluster import metrics

        metrics.add_metrics(self, what)

    def check_metrics(self, args: argparse.Namespace) -> None:
        """A usage error for a non-loopback --metrics without --metrics-public."""
        from chatcluster import metrics

        why = metrics.metrics_error(args.metrics, args.metrics_public)
        if why is not None:
            self.error(why)

    def add_log_level(self) -> None:
        """The ``--log-level`` every program takes (debug also shows an operator
        error's traceback)."""
        self.add_argument(
            "--log-level",
            default="info",
            type=str.lower,
            choices=LEVELS,
            metavar="LEVEL",
            help=f"{', '.join(LEVELS)} (default: %(default)s); debug also prints "
            f"the traceback of a start-up error",
        )


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of blanks folded into single spaces."""
    return " ".join(str(text).split())


# Argument types: each raises ArgumentTypeError, which Parser reports as one line.


def positive_int(text: str) -> int:
    """A whole number above 0 (a size or a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a number of seconds above 0")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not between 0 and 65535")
    return value


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:PORT`` for IPv6, ``:PORT`` for every interface)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 0.0.0.0:7272")
    try:
        number = port_number(port)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {port!r} is not a port number (HOST:PORT, e.g. 0.0.0.0:7272)"
        ) from None
    host = host.removeprefix("[").removesuffix("]")
    return host or "0.0.0.0", number


def zmq_address_error(address: str, *, bind: bool = False, any_port: bool = False) -> str | None:
    """Why ``address`` is no ZeroMQ address we can bind (``bind``) or dial; None if it is.

    tcp:// needs a host and a port (``*`` or 0 for any port only where ``bind`` or
    ``any_port``; ``*`` as host only where ``bind``); ipc:// and inproc:// a path.
    """
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ZMQ_SCHEMES:
        return f"{address!r} is not a ZeroMQ address: give {ZMQ_EXAMPLE}"
    if not rest:
        return f"{address!r} names no {'path' if scheme != 'tcp' else 'host and port'}"
    if scheme != "tcp":
        return None
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        return f"{address!r} has no port: give {ZMQ_EXAMPLE}"
    if host == "*" and not bind:
        return f"{address!r}: '*' (every interface) can be bound, not dialled: give a host"
    if port == "*" or (port == "0" and (bind or any_port)):
        if bind or any_port:
            return None
        return f"{address!r}: '*' (any port) can be bound, not dialled: give the port"
    if not port.isdigit() or not 0 < int(port) <= 65535:
        return f"{address!r}: {port!r} is not a port number (1-65535)"
    return None


def zmq_address(*, bind: bool = False, any_port: bool = False) -> Callable[[str], str]:
    """An argument type checking a ZeroMQ address (see ``zmq_address_error``)."""

    def check(text: str) -> str:
        why = zmq_address_error(text, bind=bind, any_port=any_port)
        if why is not None:
            raise argparse.ArgumentTypeError(why)
        return text

    check.__name__ = "ZeroMQ address"
    return check


def zmq_failure(exc: zmq.ZMQError, action: str, address: str, hint: str = "") -> OperatorError:
    """The OperatorError for a failed bind or connect of ``address``.

    ``action`` is "bind" or "connect"; ``hint`` says what to do about a busy address.
    """
    why = (exc.strerror or str(exc)).split(" (addr=")[0]  # pyzmq appends the address
    # libzmq reports these with the system's own numbers
    if exc.errno == errno.EADDRINUSE and hint:
        why = f"{why} ({hint})"
    elif exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV):
        why = f"{why} (no interface of this machine has that address)"
    elif exc.errno == errno.EINVAL:
        why = f"{why}: give {ZMQ_EXAMPLE}"
    return OperatorError(f"cannot {action} {address}: {why}")


def os_reason(exc: OSError) -> str:
    """The system's short reason for ``exc`` ("Address already in use"), without the
    wrapping some libraries add around it."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)  # getaddrinfo's errors are negative


def raised_at(exc: BaseException) -> str:
    """``file:line`` where ``exc`` was raised, skipping the import machinery's frames.

    For a SyntaxError, where the bad code is.
    """
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def run(main: Callable[[Sequence[str] | None], int], prog: str) -> NoReturn:
    """Call ``main`` and exit with its code; an OperatorError becomes its one line."""
    try:
        code = main(None)
    except OperatorError as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger(prog).debug("operator error", exc_info=exc)
        sys.stderr.write(f"{prog}: {one_line(exc)}\n")
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `python -m register status | head`
        sys.stderr.close()
        code = 0
    sys.exit(code)
