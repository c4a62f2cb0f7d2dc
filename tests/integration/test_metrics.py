"""Metrics (#15) over real processes: a scripted chat moves the counters by exactly
what it did, the exposition parses with prometheus_client's own parser, and
/health follows the workers.

One cluster (1 gateway with its own --metrics, 2 workers, the register serving
the cluster's figures) for the module; the scenarios run in order, each reading
the figures before and after what it does. Every wait is for a fact (a counter
reaching its value), bounded by TIMEOUT; a counter that must not move further is
read again after something later moved another one.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from websockets.frames import Frame, Opcode

from businessworker.testing import TIMEOUT
from register import protocol as register_protocol
from tests.chat import ChatClient
from tests.cluster import Cluster, free_port

Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]
UPGRADE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
PING = Frame(Opcode.PING, b"p" * 125).serialize(mask=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    port, gateway_port = free_port(), free_port()
    with Cluster(
        gateways=1,
        workers=2,
        register_args=["--metrics", f"127.0.0.1:{port}"],
        gateway_args=["--metrics", f"127.0.0.1:{gateway_port}"],
    ) as c:
        c.metrics_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        c.gateway_metrics_url = f"http://127.0.0.1:{gateway_port}"  # type: ignore[attr-defined]
        yield c


def get(url: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of a GET; an HTTP error status is an answer too."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def parse(text: str) -> Figures:
    """Every sample, by (name, labels), read with prometheus_client's own parser."""
    figures: Figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            figures[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return figures


async def scrape(url: str) -> Figures:
    status, _, body = await asyncio.to_thread(get, f"{url}/metrics")
    assert status == 200, body
    return parse(body)


def total(figures: Figures, name: str, **labels: str) -> float:
    """The sum of ``name`` over every sample whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in figures.items() if n == name and wanted <= ls)


async def until(
    url: str, check: Callable[[Figures], bool], what: str, timeout: float = TIMEOUT
) -> Figures:
    """Scrape until ``check`` holds (a fact), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        figures = await scrape(url)
        if check(figures):
            return figures
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.1)


def moved(before: Figures, name: str, by: float, **labels: str) -> Callable[[Figures], bool]:
    """A check: ``name`` (summed over ``labels``) is ``by`` above ``before``."""
    start = total(before, name, **labels)
    return lambda figures: total(figures, name, **labels) == start + by


def wire_size(frame: str) -> int:
    """Bytes of a server text frame carrying ``frame``: header, then the payload."""
    n = len(frame.encode())
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


async def test_the_exposition_parses_and_names_every_member(cluster: Cluster) -> None:
    url = cluster.metrics_url  # type: ignore[attr-defined]
    status, headers, _ = await asyncio.to_thread(get, f"{url}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert headers["Access-Control-Allow-Origin"] == "*"  # the admin page reads it
    figures = await until(
        url,
        lambda f: (
            total(f, "gateway_workers_linked") == 2 and total(f, "worker_gateways_linked") == 2
        ),
        "both workers' figures with the gateway linked to both",
    )
    roles = {dict(ls)["role"] for (n, ls) in figures if n == "process_up_seconds"}
    assert roles == {"register", "gateway", "worker"}
    assert total(figures, "register_members", member_role="worker") == 2
    assert total(figures, "register_members", member_role="gateway") == 1
    # The gateway's own endpoint: the same names, its figures alone.
    own = await scrape(cluster.gateway_metrics_url)  # type: ignore[attr-defined]
    assert {dict(ls)["role"] for (n, ls) in own if n == "process_up_seconds"} == {"gateway"}
    assert "gateway_connections" in {n for n, _ in own}
    status, _, _ = await asyncio.to_thread(get, f"{url}/nothing")
    assert status == 404


async def test_a_scripted_chat_moves_the_counters_by_exactly_what_it_did(
    cluster: Cluster,
) -> None:
    url = cluster.metrics_url  # type: ignore[attr-defined]
    before = await scrape(url)
    alice = await ChatClient.open(cluster.ws_url(0))
    bob = await ChatClient.open(cluster.ws_url(0))
    await until(url, moved(before, "gateway_connections", 2), "2 connections open")
    await alice.login("alice", room="metrics")
    await bob.login("bob", room="metrics")
    assert (await alice.expect("login"))["name"] == "bob"
    await alice.say("hello")
    await alice.expect("say")
    await bob.expect("say")
    await alice.send("this is not JSON")
    assert (await alice.expect("error"))["code"] == "bad_json"

    # A refused handshake: a plain GET, no upgrade (426).
    with socket.create_connection(("127.0.0.1", cluster.ws_ports[0])) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 426"), answer

    frames = alice.frames + bob.frames
    messages = 4  # two logins, a say, the bad JSON
    after = await until(
        url,
        lambda f: all(
            check(f)
            for check in (
                moved(before, "gateway_handshakes_total", 2),
                moved(before, "gateway_handshake_refusals_total", 1, status="426"),
                moved(before, "gateway_client_messages_received_total", messages),
                moved(before, "gateway_client_frames_sent_total", len(frames)),
                moved(before, "gateway_client_bytes_sent_total", sum(map(wire_size, frames))),
                moved(before, "worker_events_total", messages, kind="message"),
                moved(before, "worker_events_total", 2, kind="connect"),
                moved(before, "worker_callback_seconds_count", messages, kind="message"),
                moved(before, "worker_app_events_total", 1, event="error_bad_json"),
            )
        ),
        "the chat's counts",
    )
    assert total(after, "worker_callback_exceptions_total") == total(
        before, "worker_callback_exceptions_total"
    )
    assert total(after, "gateway_client_bytes_received_total") > total(
        before, "gateway_client_bytes_received_total"
    )
    assert total(after, "worker_commands_total") > total(before, "worker_commands_total")

    # They leave: two disconnects with 1000, and nothing more was sent to anybody.
    await alice.close()
    await bob.close()
    final = await until(
        url,
        lambda f: (
            moved(before, "gateway_disconnects_total", 2, code="1000")(f)
            and moved(before, "worker_events_total", 2, kind="close")(f)
            and moved(before, "gateway_connections", 0)(f)
        ),
        "two closes",
    )
    assert total(final, "gateway_client_frames_sent_total") == total(
        after, "gateway_client_frames_sent_total"
    )
    assert total(final, "gateway_client_messages_received_total") == total(
        after, "gateway_client_messages_received_total"
    )


class Pinger(threading.Thread):
    """A client that sends pings and never reads their pongs: a slow consumer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()

    def run(self) -> None:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(UPGRADE.format(port=self.port).encode())
            response = b""
            while b"\r\n\r\n" not in response:
                response += sock.recv(1024)
            sock.settimeout(0.05)
            batch = PING * 100
            while not self.stop.is_set():
                try:
                    sock.send(batch)
                except TimeoutError:
                    continue  # not read any more: cut off
                except OSError:
                    return


async def test_a_slow_consumer_is_counted_once(cluster: Cluster) -> None:
    url = cluster.metrics_url  # type: ignore[attr-defined]
    before = await scrape(url)
    pinger = Pinger(cluster.ws_ports[0])
    pinger.start()
    try:
        await until(url, moved(before, "gateway_slow_consumers_closed_total", 1), "a cut-off")
    finally:
        pinger.stop.set()
        await asyncio.to_thread(pinger.join)
    after = await until(
        url,
        lambda f: (
            moved(before, "gateway_disconnects_total", 1, code="1008")(f)
            and moved(before, "worker_events_total", 1, kind="close")(f)
        ),
        "its disconnect with 1008 and its close event",
    )
    assert (
        total(after, "gateway_slow_consumers_closed_total")
        == total(before, "gateway_slow_consumers_closed_total") + 1
    )
    assert total(after, "gateway_handshakes_total") == total(before, "gateway_handshakes_total") + 1
    assert total(after, "gateway_client_messages_received_total") == total(
        before, "gateway_client_messages_received_total"
    )


async def test_a_peer_without_the_key_is_a_register_refusal(cluster: Cluster) -> None:
    url = cluster.metrics_url  # type: ignore[attr-defined]
    before = await scrape(url)
    sock = zmq.Context.instance().socket(zmq.DEALER)  # plain: no CURVE, no key
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, -1)  # one attempt: exactly one refusal
    try:
        sock.connect(cluster.register_address)
        sock.send(register_protocol.pack([register_protocol.STATUS]))
        await until(
            url, moved(before, "register_refusals_total", 1, reason="handshake"), "a refusal"
        )
    finally:
        sock.close()


async def health(url: str) -> tuple[int, str]:
    status, _, body = await asyncio.to_thread(get, f"{url}/health")
    return status, body.strip()


async def until_health(url: str, code: int, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while (answer := await health(url)) != (code, text):
        assert time.monotonic() < deadline, f"health is {answer}, not {(code, text)}"
        await asyncio.sleep(0.1)


async def test_workers_lost_events_handed_over_and_health(cluster: Cluster) -> None:
    """Workers killed and stopped, counted on the gateway and the register; the events of a
    killed worker handed over (to the waiting queue: no worker is left); /health 503 while
    no worker is linked and 200 again when one starts."""
    url = cluster.metrics_url  # type: ignore[attr-defined]
    await until_health(url, 200, "ok: 1 gateways, 2 workers")
    before = await scrape(url)
    client = await ChatClient.open(cluster.ws_url(0))
    await until(url, moved(before, "worker_events_total", 1, kind="connect"), "its connect")

    # Worker 1 killed: its client (if it had it) moves to worker 0, which is then the only one.
    cluster.kill_worker(1)
    await until(
        url,
        lambda f: (
            moved(before, "gateway_workers_lost_total", 1, why="disconnected")(f)
            and moved(before, "register_drops_total", 1, member_role="worker")(f)
            and total(f, "register_members", member_role="worker") == 1
        ),
        "the killed worker lost by the gateway and dropped by the register",
    )
    await until_health(url, 200, "ok: 1 gateways, 1 workers")

    # Worker 0 paused, sent 3 events it cannot acknowledge, then killed: 3 handed over.
    proc = cluster.workers[0]
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(3):
            await client.send("not JSON")
        await until(url, moved(before, "gateway_events_total", 1 + 3), "3 events routed")
    finally:
        cluster.kill_worker(0)  # SIGKILL ends a stopped process too
    lost = await until(
        url,
        lambda f: (
            moved(before, "gateway_workers_lost_total", 2)(f)  # disconnected, or silent
            and moved(before, "gateway_events_handed_over_total", 3)(f)
            and total(f, "gateway_events_waiting") == 3
        ),
        "worker 0 lost, its 3 events handed over to the waiting queue",
    )
    await until_health(url, 503, "no worker linked (1 gateways, 0 workers)")
    assert total(lost, "gateway_workers_linked") == 0

    # A worker starts: the 3 events are handled (3 bad_json errors), the cluster is healthy.
    cluster.start_worker(0)
    await until_health(url, 200, "ok: 1 gateways, 1 workers")
    for _ in range(3):
        assert (await client.expect("error"))["code"] == "bad_json"
    await until(url, lambda f: total(f, "gateway_events_waiting") == 0, "nothing waiting")

    # The last worker stops (SIGTERM): a goodbye, why="stopped", 503; one starts: 200.
    stopped = await scrape(url)
    cluster.stop_worker(0)
    await until_health(url, 503, "no worker linked (1 gateways, 0 workers)")
    after = await until(
        url,
        lambda f: (
            moved(stopped, "gateway_worker_byes_total", 1)(f)
            and moved(stopped, "gateway_workers_lost_total", 1, why="stopped")(f)
            and moved(stopped, "register_leaves_total", 1, member_role="worker")(f)
        ),
        "the stopped worker's goodbye",
    )
    assert total(after, "gateway_events_handed_over_total") == total(
        lost, "gateway_events_handed_over_total"
    )
    cluster.start_worker(0)
    await until_health(url, 200, "ok: 1 gateways, 1 workers")
    await client.close()
