"""``python -m gateway``: run one gateway process."""

from __future__ import annotations

import asyncio
import gc
import signal
import ssl

import uvloop
import zmq.asyncio

from chatcluster import cli, links, logs
from chatcluster import keys as curve
from gateway.server import Gateway, GatewayConfig
from register.client import ENV_REGISTER, register_addresses


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--listen", default="0.0.0.0:7272", help="client WebSocket HOST:PORT")
    parser.add_argument(
        "--internal", default="tcp://127.0.0.1:*", help="ZeroMQ bind address for workers"
    )
    parser.add_argument("--advertise", help="address workers connect to, if not --internal")
    parser.add_argument(
        "--register", action="append", help=f"register address, repeatable (${ENV_REGISTER})"
    )
    parser.add_argument("--curve-key", help=f"cluster secret key file (${curve.ENV_KEY})")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain links, no key: any local account can join (a WARNING at start)",
    )
    parser.add_argument("--tls-cert", help="certificate chain file: serve wss://")
    parser.add_argument("--tls-key", help="private key file of --tls-cert")
    parser.add_argument("--max-message-size", type=int, default=64 * 1024)
    parser.add_argument("--max-send-buffer", type=int, default=1024 * 1024)
    parser.add_argument(
        "--max-fragments",
        type=int,
        default=1024,
        help="frames one client message may have (over it: close 1009)",
    )
    parser.add_argument("--max-waiting", type=int, default=10_000)
    parser.add_argument("--drain-batch", type=int, default=500, help="clients closed per 50 ms")
    parser.add_argument("--drain-time", type=float, default=5.0, help="seconds a stop may take")
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
    host, _, port = args.listen.rpartition(":")
    config = GatewayConfig(
        link_timeout=links.link_timeout(args.link_timeout),
        host=host or "0.0.0.0",
        port=int(port),
        internal=args.internal,
        advertise=args.advertise,
        registers=register_addresses(args.register),
        keys=curve.for_process(args.curve_key, insecure=args.insecure),
        ssl=_tls(args.tls_cert, args.tls_key),
        max_message_size=args.max_message_size,
        max_send_buffer=args.max_send_buffer,
        max_fragments=args.max_fragments,
        max_waiting=args.max_waiting,
        drain_batch=args.drain_batch,
        drain_time=args.drain_time,
    )
    _tune_gc()
    code = uvloop.run(_run(config))
    # Flush what ZeroMQ still has queued (last replies, goodbyes) before exiting.
    zmq.asyncio.Context.instance().destroy(linger=2000)
    return code


def _tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
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


async def _run(config: GatewayConfig) -> int:
    gateway = Gateway(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop)
    await gateway.run()
    return 1 if gateway.failed else 0


if __name__ == "__main__":
    cli.run(main, "gateway")
