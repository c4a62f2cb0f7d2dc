"""``python -m businessworker send|query``: the cluster's API from a shell.

    python -m businessworker send --uid 42 '{"type":"notice","text":"hi"}'
    python -m businessworker send --all 'maintenance in 5 minutes'
    python -m businessworker query get_all_client_count
    python -m businessworker query get_client_sessions_by_group room:lobby

Works against ``make run`` with no flags; elsewhere give ``--register`` (or
$CHAT_REGISTER) and the cluster's key (``--curve-key`` or $CHAT_CURVE_KEY).
``send`` prints nothing and exits 0 once every gateway concerned confirmed it;
``query`` prints its answer as JSON. Exit 1: the cluster did not answer or
confirm in time (one line says which); exit 2: a usage mistake.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from typing import Any

from businessworker import api
from businessworker.cluster import QUERIES, AsyncCluster, ClusterError
from chatcluster import cli


def main(argv: list[str]) -> int:
    parser = cli.Parser(prog="python -m businessworker", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="send|query")
    send = verbs.add_parser("send", help="send DATA to clients", description=__doc__)
    to = send.add_mutually_exclusive_group(required=True)
    to.add_argument("--all", action="store_true", help="every client of the cluster")
    to.add_argument("--group", metavar="G", help="every member of group G")
    to.add_argument("--uid", metavar="U", help="every connection bound to uid U")
    to.add_argument("--client", metavar="ID", type=int, help="one client, by its client id")
    send.add_argument("data", metavar="DATA", help="the text frame to send, as given")
    send.add_argument(
        "--key",
        metavar="K",
        help="idempotency key: the same key again within 10 minutes is carried out once",
    )
    query = verbs.add_parser("query", help="ask the cluster; prints JSON", description=__doc__)
    query.add_argument("name", metavar="NAME", choices=QUERIES, help=", ".join(QUERIES))
    query.add_argument("args", metavar="ARG", nargs="*", help="its arguments")
    for sub in (send, query):
        sub.add_registers()
        sub.add_cluster_key("for a cluster run --insecure")
        sub.add_argument(
            "--timeout", type=cli.positive_float, default=5.0, help="seconds to wait (default 5)"
        )
    args = parser.parse_args(argv)
    parser.check_cluster_key(args)
    call_args: list[Any] = []
    if args.verb == "query":
        call_args = _arguments(parser, args.name, args.args)
    try:
        result = asyncio.run(_run(args, call_args))
    except ClusterError as exc:
        print(f"python -m businessworker: {exc}", file=sys.stderr)
        return 1
    if args.verb == "query":
        print(json.dumps(result, ensure_ascii=False, default=str))
    return 0


async def _run(args: Any, call_args: list[Any]) -> Any:
    cluster = AsyncCluster(
        args.register, curve_key=args.curve_key, insecure=args.insecure, timeout=args.timeout
    )
    try:
        if args.verb == "query":
            return await getattr(cluster, args.name)(*call_args)
        if args.all:
            return await cluster.send_to_all(args.data, key=args.key)
        if args.group is not None:
            return await cluster.send_to_group(args.group, args.data, key=args.key)
        if args.uid is not None:
            return await cluster.send_to_uid(args.uid, args.data, key=args.key)
        return await cluster.send_to_client(args.client, args.data, key=args.key)
    finally:
        await cluster.close()


def _arguments(parser: cli.Parser, name: str, given: list[str]) -> list[Any]:
    """The query's arguments from the command line: client ids as ints."""
    params = list(inspect.signature(getattr(api, name)).parameters.values())
    if len(given) != len(params):
        wanted = " ".join(p.name.upper() for p in params) or "no arguments"
        parser.error(f"query {name} takes {wanted}")
    out: list[Any] = []
    for param, value in zip(params, given, strict=True):
        if param.name == "client_id":
            if not value.isdecimal():
                parser.error(f"query {name}: CLIENT_ID is a number, not {value!r}")
            out.append(int(value))
        else:
            out.append(value)
    return out
