"""``python -m businessworker --app MODULE``: run one business worker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop

from businessworker.app import App
from businessworker.worker import Worker
from register import protocol as register_protocol


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m businessworker", description=__doc__)
    parser.add_argument("--app", required=True, help="importable module with the callbacks")
    parser.add_argument(
        "--register",
        action="append",
        help=f"register address, repeatable (default {register_protocol.DEFAULT_ADDRESS})",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    app = App.load(args.app)
    return uvloop.run(_run(app, args.register or [register_protocol.DEFAULT_ADDRESS]))


async def _run(app: App, registers: list[str]) -> int:
    worker = Worker(app, registers)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
    return 1 if worker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
