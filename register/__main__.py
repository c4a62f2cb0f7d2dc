"""``python -m register [run]``: run it; ``status``: ask a live one; ``keys``: a new key."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import uvloop
import zmq.asyncio

from chatcluster import cli, links, logs, metrics
from chatcluster import keys as curve
from register import protocol
from register.client import fetch_status, register_addresses
from register.server import Register

COMMANDS = ("run", "status", "keys")


def parser() -> cli.Parser:
    """The command line: subcommands ``run`` (the default), ``status`` and ``keys``,
    each with only its own options."""
    top = cli.Parser(
        prog="python -m register",
        description="The cluster's register (discovery). With no subcommand: run. "
        "`python -m register SUBCOMMAND --help` lists a subcommand's options.",
    )
    sub = top.add_subparsers(dest="command", metavar="{run,status,keys}")

    run = sub.add_parser(
        "run", help="run a register (the default)", description="Run a register until SIGTERM."
    )
    run.add_argument(
        "--bind",
        default=protocol.DEFAULT_ADDRESS,
        type=cli.zmq_address(bind=True),
        metavar="ADDR",
        help="ZeroMQ address to bind, where gateways and workers reach it "
        "(default: %(default)s; beyond loopback every member needs the cluster key)",
    )
    run.add_cluster_key("plain links, no key: any local account can join (a WARNING at start)")
    run.add_link_timeout()
    run.add_metrics(
        "the whole cluster's figures (every member's, sent with its heartbeats) and /health"
    )
    run.add_log_level()

    status = sub.add_parser(
        "status",
        help="print a live register's table: gateways, connections, workers",
        description="Ask a live register for its table and print it.",
    )
    status.add_registers("register to ask, repeatable: the first that answers is shown")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument(
        "--timeout",
        type=cli.positive_float,
        default=3.0,
        metavar="S",
        help="seconds to wait for each register's answer (default: %(default)g)",
    )
    status.add_cluster_key("ask a register started --insecure (plain link, no key)")
    status.add_log_level()

    keys = sub.add_parser(
        "keys",
        help="make a new cluster key (CURVE keypair) to copy to every machine",
        description="Write a new cluster keypair: DIR/cluster.key_secret (mode 600, copy it "
        "to every machine) and DIR/cluster.key (public).",
    )
    keys.add_argument(
        "--out",
        default="keys",
        metavar="DIR",
        help="folder for the new key files, made if missing; it must not hold a "
        "cluster key already (default: %(default)s)",
    )
    return top


def _misplaced(top: cli.Parser, command: str, extra: list[str]) -> None:
    """Report unknown arguments, naming the subcommand they belong to, if any."""
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    hint = ""
    for name, sub in subs.choices.items():
        known = {o for a in sub._actions for o in a.option_strings}
        if name != command and any(e.split("=")[0] in known for e in extra):
            hint = f": {'they belong' if len(extra) > 1 else 'it belongs'} to `{sub.prog}`"
            break
    subs.choices[command].error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "run")  # `python -m register --bind ...` runs one
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra:
        _misplaced(top, args.command, extra)
    if args.command == "keys":
        secret = curve.generate(args.out, fresh=True)
        print(f"secret key (copy to every machine, keep private): {secret}")
        print(f"public key: {secret.with_suffix('.key')}")
        print(f"use: --curve-key {secret}   or   {curve.ENV_KEY}={secret}")
        return 0
    logs.setup(args.log_level)
    if args.curve_key and args.insecure:
        raise cli.OperatorError("give --curve-key or --insecure, not both", cli.USAGE)
    if args.command == "status":
        keys = curve.for_process(args.curve_key, insecure=args.insecure, create=False)
        addresses = register_addresses(args.register)
        return uvloop.run(_status(addresses, args.json, keys, args.timeout))
    run_parser = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "run"
    ]
    run_parser.check_metrics(args)
    keys = curve.for_process(args.curve_key, insecure=args.insecure)
    code = uvloop.run(_run(args.bind, keys, links.link_timeout(args.link_timeout), args.metrics))
    # Flush what ZeroMQ still has queued (last replies, goodbyes) before exiting.
    zmq.asyncio.Context.instance().destroy(linger=2000)
    return code


async def _run(
    bind: str,
    keys: curve.Keys | None,
    link_timeout: float,
    metrics_at: tuple[str, int] | None = None,
) -> int:
    register = Register(bind, keys=keys, link_timeout=link_timeout)
    figures = register.figures
    return await metrics.serve_member(register, metrics_at, figures.render, figures.health)


async def _status(
    addresses: list[str], as_json: bool, keys: curve.Keys | None, timeout: float
) -> int:
    for address in addresses:
        try:
            status = await fetch_status(address, timeout=timeout, keys=keys)
            break
        except TimeoutError:
            continue
    else:
        raise cli.OperatorError(
            f"no answer from {', '.join(addresses)} within {timeout:g} s: is the register "
            f"running (deploy/ctl status), and with this cluster's key?"
        )
    if as_json:
        print(json.dumps(status))
        return 0
    now = time.time()
    print(f"register {status['register']} up {status['uptime']} s")
    print(f"{len(status['gateways'])} gateway(s)")
    for g in status["gateways"]:
        print(
            f"  {g['id']}  {g['address']}  connections={g['connections']}"
            f"  workers={g['workers']}  up={now - g['started']:.0f}s"
            f"  host={g['host']} pid={g['pid']}"
        )
    print(f"{len(status['workers'])} worker(s)")
    for w in status["workers"]:
        print(
            f"  {w['id']}  app={w['app']}  gateways={w['gateways']}"
            f"  up={now - w['started']:.0f}s  host={w['host']} pid={w['pid']}"
        )
    publishers = status.get("publishers", [])
    if publishers:
        print(f"{len(publishers)} publisher(s)")
        for w in publishers:
            print(f"  {w['id']}  gateways={w['gateways']}  host={w['host']} pid={w['pid']}")
    return 0


if __name__ == "__main__":
    cli.run(main, "register")
