"""``python -m gateway``: run one gateway process."""

from __future__ import annotations

import gc
import os
import re
import ssl

import uvloop
import zmq.asyncio

from chatcluster import cli, links, logs
from chatcluster import keys as curve
from gateway.server import Gateway, GatewayConfig, binds_everywhere
from register.client import register_addresses


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m gateway", description=__doc__)
    parser.add_argument(
        "--listen",
        default="0.0.0.0:7272",
        type=cli.host_port,
        metavar="HOST:PORT",
        help="where clients connect (WebSocket), shared by every gateway of this machine "
        "(SO_REUSEPORT; default: %(default)s)",
    )
    parser.add_argument(
        "--internal",
        default="tcp://127.0.0.1:*",
        type=cli.zmq_address(bind=True),
        metavar="ADDR",
        help="ZeroMQ address to bind for the workers; port * picks a free one "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--advertise",
        type=cli.zmq_address(any_port=True),
        metavar="ADDR",
        help="address the workers dial, when not --internal (needed when --internal binds "
        "every interface); port * means --internal's (default: --internal's address)",
    )
    parser.add_registers()
    parser.add_cluster_key("plain links, no key: any local account can join (a WARNING at start)")
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate chain: serve wss:// instead of ws:// (default: ws://)",
    )
    parser.add_argument(
        "--tls-key",
        metavar="FILE",
        help="PEM private key of --tls-cert (default: read from the --tls-cert file)",
    )
    parser.add_argument(
        "--max-message-size",
        type=cli.positive_int,
        default=64 * 1024,
        metavar="BYTES",
        help="largest client message, across its fragments; a bigger one closes the "
        "connection with 1009 (default: %(default)d = 64 KiB)",
    )
    parser.add_argument(
        "--max-send-buffer",
        type=cli.positive_int,
        default=1024 * 1024,
        metavar="BYTES",
        help="bytes queued for a client that does not read before it is closed with 1008 "
        "(default: %(default)d = 1 MiB)",
    )
    parser.add_argument(
        "--max-fragments",
        type=cli.positive_int,
        default=1024,
        metavar="FRAMES",
        help="frames one client message may have; more closes the connection with 1009 "
        "(default: %(default)d)",
    )
    parser.add_argument(
        "--max-waiting",
        type=cli.positive_int,
        default=10_000,
        metavar="EVENTS",
        help="client events kept while no worker is linked; a client whose event does "
        "not fit is closed with 1013 (default: %(default)d)",
    )
    parser.add_argument(
        "--drain-batch",
        type=cli.positive_int,
        default=500,
        metavar="CLIENTS",
        help="on stop, clients closed (1012, reconnect elsewhere) per 50 ms; batches grow "
        "to fit --drain-time (default: %(default)d)",
    )
    parser.add_argument(
        "--drain-time",
        type=cli.positive_float,
        default=5.0,
        metavar="S",
        help="seconds a stop may take to close every client (default: %(default)g)",
    )
    parser.add_link_timeout()
    parser.add_metrics("this gateway's figures")
    parser.add_log_level()
    args = parser.parse_args(argv)
    parser.check_metrics(args)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert (the certificate it is the key of)")
    parser.check_cluster_key(args)
    if args.advertise is None and binds_everywhere(args.internal):
        parser.error(
            f"--internal {args.internal} binds every interface: say with --advertise which "
            f"address the workers dial (e.g. --advertise tcp://10.0.0.2:*)"
        )
    logs.setup(args.log_level)
    host, port = args.listen
    tls = _tls(args.tls_cert, args.tls_key)
    registers = register_addresses(args.register)
    config = GatewayConfig(
        link_timeout=links.link_timeout(args.link_timeout),
        host=host,
        port=port,
        internal=args.internal,
        advertise=args.advertise,
        registers=registers,
        keys=curve.for_process(args.curve_key, insecure=args.insecure),
        ssl=tls,
        max_message_size=args.max_message_size,
        max_send_buffer=args.max_send_buffer,
        max_fragments=args.max_fragments,
        max_waiting=args.max_waiting,
        drain_batch=args.drain_batch,
        drain_time=args.drain_time,
    )
    _tune_gc()
    code = uvloop.run(_run(config, args.metrics))
    # Flush what ZeroMQ still has queued (last replies, goodbyes) before exiting.
    zmq.asyncio.Context.instance().destroy(linger=2000)
    return code


def _tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server's TLS context, or None for ws://; a file that will not load is the
    operator's to fix."""
    if cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files = f"--tls-cert {cert}" + (f" --tls-key {key}" if key else "")
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        missing = f"--tls-cert {cert}" if not os.path.exists(cert) else f"--tls-key {key}"
        raise cli.OperatorError(f"{missing}: no such file") from exc
    except OSError as exc:  # ssl.SSLError is one
        why = re.sub(r"^\[SSL\] | \(_ssl\.c:\d+\)$", "", str(exc.args[-1]))
        raise cli.OperatorError(
            f"{files}: cannot load them ({why}): give a PEM certificate chain and its "
            f"private key (in the same file, or with --tls-key)"
        ) from exc
    return context


def _tune_gc() -> None:
    """Collect the young generation every 5,000 allocations instead of 700.

    Every new connection allocates a few hundred objects, and websockets'
    protocol objects hold reference cycles that only the collector frees, so
    at thousands of connections a second collections ran very often. Measured
    with the handshake benchmark: gateway CPU per connection 190 -> 165 us.
    Objects made while starting up are frozen out of every collection.
    """
    gc.freeze()
    gc.set_threshold(5000, 10, 10)


async def _run(config: GatewayConfig, metrics_at: tuple[str, int] | None = None) -> int:
    from chatcluster import metrics as figures
    from gateway import metrics

    gateway = Gateway(config)

    def render() -> bytes:
        return figures.exposition(
            figures.SnapshotCollector(
                lambda: [(("gateway", gateway.id), metrics.snapshot(gateway))]
            )
        )

    return await figures.serve_member(gateway, metrics_at, render)


if __name__ == "__main__":
    cli.run(main, "gateway")
