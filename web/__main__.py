"""Command line entry point: ``python -m web [--host H] [--port P] [--ws-url URL]``."""

from __future__ import annotations

import argparse
import logging
import sys

from web.server import serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m web", description="Serve the chat page (static files only)."
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, default=55151, help="port to bind, 0 for any free port (default 55151)"
    )
    parser.add_argument(
        "--ws-url",
        default=None,
        help="WebSocket URL the page connects to, e.g. ws://chat.example:7272 "
        "(default: ws://<the page's host>:7272; a ?ws= page parameter overrides both)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every request (DEBUG level)"
    )
    args = parser.parse_args(argv)
    if args.ws_url and not args.ws_url.startswith(("ws://", "wss://")):
        parser.error("--ws-url must start with ws:// or wss://")
    return args


def main(argv: list[str] | None = None) -> int:
    """Configure logging and run the server until SIGTERM/SIGINT."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        serve(args.host, args.port, args.ws_url)
    except OSError as exc:
        logging.getLogger("web").error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
