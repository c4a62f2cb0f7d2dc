"""``python -m register``: run it; ``status``: ask a live one; ``keys``: make CURVE keys."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import uvloop
import zmq.asyncio

from chatcluster import cli, links, logs
from chatcluster import keys as curve
from register import protocol
from register.client import fetch_status, register_addresses
from register.server import Register


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m register", description=__doc__)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "status", "keys"])
    parser.add_argument("--bind", default=protocol.DEFAULT_ADDRESS, help="ZeroMQ address to bind")
    parser.add_argument("--register", action="append", help="register to ask (status)")
    parser.add_argument("--json", action="store_true", help="status as one JSON document")
    parser.add_argument("--curve-key", help=f"cluster secret key file (default ${curve.ENV_KEY})")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain links, no key: any local account can join (a WARNING at start)",
    )
    parser.add_argument("--out", default="keys", help="folder for new keys (keys)")
    parser.add_argument(
        "--link-timeout",
        type=float,
        default=None,
        help=f"seconds a silent internal link is waited for before its peer is taken for "
        f"gone (${links.ENV_LINK_TIMEOUT}, default {links.LINK_TIMEOUT:g})",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    if args.command == "keys":
        secret = curve.generate(args.out)
        print(f"secret key (copy to every machine, keep private): {secret}")
        print(f"public key: {secret.with_suffix('.key')}")
        print(f"use: --curve-key {secret}   or   {curve.ENV_KEY}={secret}")
        return 0
    if args.command == "status":
        keys = curve.for_process(args.curve_key, insecure=args.insecure, create=False)
        address = register_addresses(args.register)[0]
        return uvloop.run(_status(address, args.json, keys))
    keys = curve.for_process(args.curve_key, insecure=args.insecure)
    code = uvloop.run(_run(args.bind, keys, links.link_timeout(args.link_timeout)))
    # Flush what ZeroMQ still has queued (last replies, goodbyes) before exiting.
    zmq.asyncio.Context.instance().destroy(linger=2000)
    return code


async def _run(bind: str, keys: curve.Keys | None, link_timeout: float) -> int:
    register = Register(bind, keys=keys, link_timeout=link_timeout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, register.stop)
    await register.run()
    return 1 if register.failed else 0


async def _status(address: str, as_json: bool, keys: curve.Keys | None) -> int:
    status = await fetch_status(address, keys=keys)
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
    return 0


if __name__ == "__main__":
    cli.run(main, "register")
