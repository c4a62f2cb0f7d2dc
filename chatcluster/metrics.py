"""Prometheus metrics for every member: the catalogue, snapshots, and the HTTP endpoint.

Why it is built this way:

- **The hot path pays nothing per frame.** Gateways and workers keep plain ``int``
  attributes (``x += 1``, tens of nanoseconds) and, where counting per item would
  cost, count once per command or per read (``gateway.commands`` adds a
  broadcast's recipients in one addition). Nothing calls prometheus_client per
  frame: a figure becomes a metric only when somebody asks, in ``snapshot()``
  (once per heartbeat, for the register) and in ``SnapshotCollector.collect``
  (once per scrape).
- **One catalogue** (``CATALOG``): every metric's name, type, help and label names,
  shared by all roles. A member's snapshot is then a compact dict of numbers
  (``{name: value}``, or ``{name: [[label, ..., value], ...]}``, histograms as
  ``[counts per bucket, sum]``), cheap to send with its heartbeat to the register,
  which renders the figures of every member under ``role`` and ``id`` labels: the
  cluster as one scrape target.
- **The endpoint** is a small asyncio HTTP server in the member's own loop (no
  thread: a scrape reads the counters where they are written), bounded (64
  connections, 8 KiB of request, 5 s per request), stopped with the member.
  Loopback only unless the operator says ``--metrics-public``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from chatcluster import process
from chatcluster.cli import OperatorError, os_reason

log = logging.getLogger("chatcluster.metrics")

Snapshot = dict[str, Any]
"""A member's figures: ``{name: value}``, ``{name: [[*labels, value], ...]}`` for
labelled ones, ``{name: [[counts per bucket], sum]}`` for histograms."""

SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds of the duration histograms (seconds); +Inf follows."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric: ``kind`` is counter, gauge or histogram; ``labels`` its own label names."""

    kind: str
    help: str
    labels: tuple[str, ...] = ()


def _c(help: str, *labels: str) -> Spec:
    return Spec("counter", help, labels)


def _g(help: str, *labels: str) -> Spec:
    return Spec("gauge", help, labels)


def _h(help: str, *labels: str) -> Spec:
    return Spec("histogram", help, labels)


CATALOG: dict[str, Spec] = {
    # Every member
    "process_up_seconds": _g("seconds since this member started"),
    # Gateway: clients
    "gateway_connections": _g("client WebSocket connections open"),
    "gateway_members_away": _g("kept members whose connection went, within their grace"),
    "gateway_handshakes_total": _c("opening handshakes completed (the connection was opened)"),
    "gateway_handshake_refusals_total": _c(
        "opening handshakes refused, by HTTP status (400 bad request, 405 not GET, 408 too "
        "slow, 426 not a WebSocket upgrade or another version, 431 head too big, 505 not "
        "HTTP/1.1)",
        "status",
    ),
    "gateway_client_messages_received_total": _c("whole messages received from clients"),
    "gateway_client_bytes_received_total": _c(
        "bytes read from client sockets (handshakes included)"
    ),
    "gateway_client_frames_sent_total": _c(
        "frames queued for clients by workers' sends (one per recipient: the deliveries)"
    ),
    "gateway_client_bytes_sent_total": _c("bytes of those frames"),
    "gateway_disconnects_total": _c(
        "client connections ended, by close code (1000/1001 normal, 1006 no close frame, "
        "1007 not UTF-8, 1008 too slow or refused by the app, 1009 too big or too many "
        "fragments, 1012 gateway restarting, 1013 no worker and queue full)",
        "code",
    ),
    "gateway_slow_consumers_closed_total": _c(
        "clients cut off (1008) because over --max-send-buffer bytes waited unsent"
    ),
    "gateway_connection_resets_total": _c(
        "connections reset (SO_LINGER 0): no answer to our close in time, or cut at a drain"
    ),
    "gateway_flood_pauses_total": _c(
        "times a client was no longer read because it had 100 events unacknowledged"
    ),
    "gateway_unknown_client_sends_total": _c("sends by id to a client not on this gateway"),
    # Gateway: workers
    "gateway_workers_linked": _g("workers linked to this gateway"),
    "gateway_events_total": _c("client events (connect, message, close) routed to workers"),
    "gateway_events_waiting": _g("events waiting for a worker (none linked) or parked"),
    "gateway_events_refused_total": _c(
        "events refused because the waiting queue (--max-waiting) was full (client closed 1013)"
    ),
    "gateway_events_handed_over_total": _c(
        "unacknowledged events of a lost worker handed over to other workers"
    ),
    "gateway_workers_lost_total": _c(
        "worker sessions ended and fenced, by why: stopped (after its BYE), disconnected, "
        "silent (past the link timeout), unreachable, gap (a message went missing)",
        "why",
    ),
    "gateway_worker_byes_total": _c("workers that said they stop (BYE)"),
    "gateway_fenced_messages_total": _c("messages from fenced or unknown worker sessions, dropped"),
    "gateway_internal_messages_received_total": _c("ZeroMQ messages received from workers"),
    "gateway_internal_messages_sent_total": _c("ZeroMQ messages sent to workers"),
    # Worker
    "worker_gateways_linked": _g("gateways this worker is linked to"),
    "worker_events_total": _c("client events handled, by kind", "kind"),
    "worker_callback_seconds": _h("time from an event's arrival to its callback's end", "kind"),
    "worker_callback_exceptions_total": _c("callbacks that raised (logged; the event counts)"),
    "worker_app_events_total": _c(
        "what the app counts (businessworker.metrics.app_event); the chat: errors by code",
        "event",
    ),
    "worker_gateways_lost_total": _c("gateways found dead (their clients closed or parked)"),
    "worker_closes_made_up_total": _c("on_close run for the clients of a dead gateway"),
    "worker_sessions_reset_total": _c(
        "gateway sessions started anew (the gateway fenced us, or this loop stood still)"
    ),
    "worker_commands_total": _c("commands sent to gateways (sends, joins, sessions...)"),
    "worker_queries_total": _c("queries asked of gateways"),
    "worker_query_timeouts_total": _c("queries that got no answer in time"),
    "worker_query_seconds": _h("time a gateway took to answer a query"),
    "worker_internal_messages_sent_total": _c("ZeroMQ messages sent to gateways"),
    "worker_internal_messages_received_total": _c("ZeroMQ messages received from gateways"),
    # Register
    "register_members": _g("members in the table, by role", "member_role"),
    "register_joins_total": _c("members that joined, by role", "member_role"),
    "register_leaves_total": _c("members that said goodbye, by role", "member_role"),
    "register_drops_total": _c("members dropped (link lost, no beat in time)", "member_role"),
    "register_refusals_total": _c(
        "refusals, by reason (takeover: a second gateway with a live one's id; prefix: an "
        "id prefix another gateway owns; gone: a gateway declared gone beat again; "
        "handshake: a peer without the cluster key)",
        "reason",
    ),
    "register_stream_sends_total": _c("stream messages sent to gateways"),
}


class Histogram:
    """Fixed buckets counted in a list: ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> list[Any]:
        return [list(self.counts), self.sum]


def labelled(counts: dict[Any, int]) -> list[list[Any]]:
    """A ``{label value: count}`` dict as snapshot rows."""
    return [[str(k), v] for k, v in counts.items()]


def _family(name: str, spec: Spec, labels: list[str]) -> Metric:
    if spec.kind == "counter":
        return CounterMetricFamily(name, spec.help, labels=labels)
    if spec.kind == "histogram":
        return HistogramMetricFamily(name, spec.help, labels=labels)
    return GaugeMetricFamily(name, spec.help, labels=labels)


class SnapshotCollector:
    """A prometheus_client collector over snapshots, each with its constant labels.

    ``source`` is called at each scrape: ``[(("gateway", "3fa2..."), snapshot), ...]``
    with ``const`` naming those labels (``("role", "id")``). Names not in CATALOG
    (a newer member) are skipped.
    """

    def __init__(
        self,
        source: Callable[[], Iterable[tuple[tuple[str, ...], Snapshot]]],
        const: tuple[str, ...] = ("role", "id"),
    ) -> None:
        self.source = source
        self.const = const

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for values, snapshot in self.source():
            for name, figure in snapshot.items():
                spec = CATALOG.get(name)
                if spec is None:
                    continue
                family = families.get(name)
                if family is None:
                    family = families[name] = _family(name, spec, [*self.const, *spec.labels])
                try:
                    _add(family, spec, list(values), figure)
                except (TypeError, ValueError, IndexError):
                    log.debug("bad figure name=%s value=%r", name, figure)
        yield from families.values()


def _add(family: Metric, spec: Spec, const: list[str], figure: Any) -> None:
    if spec.kind == "histogram":
        rows = figure if spec.labels else [[figure]]
        for row in rows:
            *labels, (counts, total) = row
            family.add_metric([*const, *map(str, labels)], _buckets(counts), total)
    elif spec.labels:
        for row in figure:
            *labels, value = row
            family.add_metric([*const, *map(str, labels)], float(value))
    else:
        family.add_metric(const, float(figure))


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    bounds = [*map(repr, SECONDS_BUCKETS), "+Inf"]
    total, out = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        out.append((bound, float(total)))
    return out


def exposition(collector: SnapshotCollector) -> bytes:
    """The Prometheus text format of ``collector``'s figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry)


# The --metrics option


ENV_METRICS = "CHAT_METRICS"
LOOPBACK_NAMES = ("localhost",)


def add_metrics(parser: argparse.ArgumentParser, what: str) -> None:
    """``--metrics HOST:PORT`` and ``--metrics-public`` (see ``check_metrics``)."""
    from chatcluster.cli import host_port

    parser.add_argument(
        "--metrics",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help=f"serve {what} over HTTP at http://HOST:PORT/metrics (default: off); "
        f"loopback only unless --metrics-public",
    )
    parser.add_argument(
        "--metrics-public",
        action="store_true",
        help="allow --metrics on an address other than loopback: anyone who reaches it "
        "reads the figures (no key protects them; use a firewall)",
    )


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_error(address: tuple[str, int] | None, public: bool) -> str | None:
    """Why ``--metrics`` may not bind ``address``; None if it may."""
    if address is None:
        if public:
            return "--metrics-public without --metrics: give --metrics HOST:PORT"
        return None
    host, port = address
    if not public and not is_loopback(host):
        return (
            f"--metrics {host}:{port} is not a loopback address: the figures would answer "
            f"anyone who reaches it, with no key; add --metrics-public to mean it, or use "
            f"127.0.0.1:{port}"
        )
    return None


# The endpoint

MAX_CONNECTIONS = 64
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0

Health = Callable[[], tuple[bool, str]]


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and, if given ``health``, ``GET /health``.

    Read-only figures, so every answer says ``Access-Control-Allow-Origin: *``: the
    admin page (another origin, the page server) reads them from the browser.
    """

    def __init__(
        self,
        address: tuple[str, int],
        render: Callable[[], bytes],
        health: Health | None = None,
    ) -> None:
        self.host, self.port = address
        self.render = render
        self.health = health
        self._server: asyncio.AbstractServer | None = None
        self._open = 0

    async def start(self) -> None:
        """Bind and serve; a port we cannot have is the operator's to fix (one line)."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_REQUEST
            )
        except OSError as exc:
            why = os_reason(exc)
            if exc.errno == errno.EADDRINUSE:
                why += " (another program holds it: give another --metrics port)"
            raise OperatorError(f"cannot serve metrics on {self.host}:{self.port}: {why}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics at http://%s:%d/metrics", self.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            except ConnectionError:
                return
            status, ctype, body = self._answer(head)
            method = head.split(b" ", 1)[0]
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nAccess-Control-Allow-Origin: *\r\n"
                f"Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
            )
            if method != b"HEAD":
                writer.write(body)
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        finally:
            self._open -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return "400 Bad Request", "text/plain", b"bad request\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.render()
        if path == "/health" and self.health is not None:
            ok, why = self.health()
            return (
                ("200 OK" if ok else "503 Service Unavailable"),
                "text/plain",
                f"{why}\n".encode(),
            )
        return (
            "404 Not Found",
            "text/plain",
            b"/metrics" + (b" or /health" if self.health else b"") + b"\n",
        )


async def serve_member(
    member: process.Member,
    address: tuple[str, int] | None,
    render: Callable[[], bytes],
    health: Health | None = None,
) -> int:
    """``process.serve(member)``, with its metrics endpoint at ``address`` (None: none).

    The endpoint is bound first, so a busy port is reported before the member starts,
    and closed when the member stops.
    """
    server = None
    if address is not None:
        server = MetricsServer(address, render, health)
        await server.start()
    try:
        return await process.serve(member)
    finally:
        if server is not None:
            server.close()
