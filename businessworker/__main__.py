"""``python -m businessworker --app MODULE``: run one business worker."""

from __future__ import annotations

import asyncio
import gc
import signal

import uvloop
import zmq.asyncio

from businessworker.app import App
from businessworker.worker import Worker
from chatcluster import cli, links, logs
from chatcluster import keys as curve
from register.client import ENV_REGISTER, register_addresses


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m businessworker", description=__doc__)
    parser.add_argument("--app", required=True, help="importable module with the callbacks")
    parser.add_argument(
        "--register", action="append", help=f"register address, repeatable (${ENV_REGISTER})"
    )
    parser.add_argument("--curve-key", help=f"cluster secret key file (${curve.ENV_KEY})")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain links, no key: for a cluster started --insecure (a WARNING at start)",
    )
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
    app = App.load(args.app)
    keys = curve.for_process(args.curve_key, insecure=args.insecure)
    # What is loaded by now (modules, the app) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise traverse it every time.
    gc.freeze()
    timeout = links.link_timeout(args.link_timeout)
    code = uvloop.run(_run(app, register_addresses(args.register), keys, timeout))
    # Without this, messages still queued in ZeroMQ (a stopping worker's last
    # acknowledgements) can die with the process; destroy flushes them first.
    zmq.asyncio.Context.instance().destroy(linger=2000)
    return code


async def _run(app: App, registers: list[str], keys: curve.Keys | None, link_timeout: float) -> int:
    worker = Worker(app, registers, keys=keys, link_timeout=link_timeout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
    return 1 if worker.failed else 0


if __name__ == "__main__":
    cli.run(main, "businessworker")
