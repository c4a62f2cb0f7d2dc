"""Command line entry point: ``python -m web [--host H] [--port P] [--ws-url URL]``."""

from __future__ import annotations

import argparse

from chatcluster import cli, logs
from web.server import serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a bad value is one line and exit 2."""
    parser = cli.Parser(
        prog="python -m web", description="Serve the chat page (static files only)."
    )
    parser.add_argument(
        "--host", default="0.0.0.0", help="address to bind (default: %(default)s, every interface)"
    )
    parser.add_argument(
        "--port",
        type=cli.port_number,
        default=55151,
        help="port to bind, 0 for any free port (default: %(default)s)",
    )
    parser.add_argument(
        "--ws-url",
        default=None,
        metavar="URL",
        help="WebSocket URL the page connects to, e.g. ws://chat.example:7272 "
        "(default: ws://<the page's host>:7272; a ?ws= page parameter overrides both)",
    )
    parser.add_argument(
        "--metrics-url",
        default=None,
        metavar="URL",
        help="the cluster's metrics the admin page (/admin) reads, e.g. "
        "http://10.0.0.1:1237/metrics (default: http://<the page's host>:1237/metrics; a "
        "?metrics= page parameter overrides both)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every request (DEBUG level)"
    )
    args = parser.parse_args(argv)
    if args.ws_url and not args.ws_url.startswith(("ws://", "wss://")):
        parser.error("--ws-url must start with ws:// or wss://")
    if args.metrics_url and not args.metrics_url.startswith(("http://", "https://")):
        parser.error("--metrics-url must start with http:// or https://")
    return args


def main(argv: list[str] | None = None) -> int:
    """Configure logging and run the server until SIGTERM/SIGINT."""
    args = parse_args(argv)
    logs.setup("debug" if args.verbose else "info")
    serve(args.host, args.port, args.ws_url, args.metrics_url)
    return 0


if __name__ == "__main__":
    cli.run(main, "web")
