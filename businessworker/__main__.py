"""``python -m businessworker --app MODULE``: run one business worker.

``python -m businessworker send|query ...`` reaches the cluster's clients from a
shell instead (see ``businessworker.remote``).
"""

from __future__ import annotations

import gc
import importlib
import sys

import uvloop
import zmq.asyncio

from businessworker import metrics as worker_metrics
from businessworker.app import App
from businessworker.worker import Worker
from chatcluster import cli, links, logs
from chatcluster import keys as curve
from chatcluster import metrics as figures
from register.client import register_addresses


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if given and given[0] in ("send", "query"):
        from businessworker import remote

        return remote.main(given)
    parser = cli.Parser(prog="python -m businessworker", description=__doc__)
    parser.add_argument(
        "--app",
        required=True,
        metavar="MODULE",
        help="importable module with the callbacks, e.g. businessworker.chat (no default)",
    )
    parser.add_registers()
    parser.add_cluster_key("plain links, no key: for a cluster started --insecure (a WARNING)")
    parser.add_link_timeout()
    parser.add_metrics("this worker's figures")
    parser.add_log_level()
    args = parser.parse_args(argv)
    parser.check_cluster_key(args)
    parser.check_metrics(args)
    logs.setup(args.log_level)
    registers = register_addresses(args.register)
    app = load_app(args.app)
    keys = curve.for_process(args.curve_key, insecure=args.insecure)
    # What is loaded by now (modules, the app) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise traverse it every time.
    gc.freeze()
    timeout = links.link_timeout(args.link_timeout)
    code = uvloop.run(_run(app, registers, keys, timeout, args.metrics))
    # Without this, messages still queued in ZeroMQ (a stopping worker's last
    # acknowledgements) can die with the process; destroy flushes them first.
    zmq.asyncio.Context.instance().destroy(linger=2000)
    return code


def load_app(name: str) -> App:
    """Import the app; an app that is missing, raises on import or has no callbacks is
    the operator's to fix: one line with the exception and where it was raised."""
    if name.endswith(".py") or "/" in name:
        module = name.removesuffix(".py").replace("/", ".").strip(".")
        raise cli.OperatorError(
            f"--app {name}: give a module name, not a file: --app {module} "
            f"(from the folder that holds it, or with it on PYTHONPATH)",
            cli.USAGE,
        )
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(f"{exc.name}.")):
            raise cli.OperatorError(
                f"--app {name}: no module named {exc.name!r} (run from the folder that "
                f"holds it, or put that folder on PYTHONPATH)"
            ) from exc
        raise _import_failed(name, exc) from exc
    except Exception as exc:
        raise _import_failed(name, exc) from exc
    try:
        return App.load(module)
    except ValueError as exc:  # no callbacks
        raise cli.OperatorError(f"--app {name}: {exc}") from exc


def _import_failed(name: str, exc: BaseException) -> cli.OperatorError:
    return cli.OperatorError(
        f"--app {name}: importing it raised {type(exc).__name__}: {exc} (at {cli.raised_at(exc)})"
    )


async def _run(
    app: App,
    registers: list[str],
    keys: curve.Keys | None,
    link_timeout: float,
    metrics_at: tuple[str, int] | None = None,
) -> int:
    worker = Worker(app, registers, keys=keys, link_timeout=link_timeout)

    def render() -> bytes:
        source = [(("worker", worker.id), worker_metrics.snapshot(worker))]
        return figures.exposition(figures.SnapshotCollector(lambda: source))

    return await figures.serve_member(worker, metrics_at, render)


if __name__ == "__main__":
    cli.run(main, "businessworker")
