"""chatcluster.metrics without processes: the loopback rule, the rendering of snapshots."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from chatcluster import metrics
from chatcluster.metrics import CATALOG, Histogram, MetricsServer, SnapshotCollector, exposition


def test_loopback_only_unless_public() -> None:
    assert metrics.metrics_error(("127.0.0.1", 1237), False) is None
    assert metrics.metrics_error(("::1", 1237), False) is None
    assert metrics.metrics_error(("localhost", 1237), False) is None
    why = metrics.metrics_error(("0.0.0.0", 1237), False)
    assert why is not None and "--metrics-public" in why
    assert metrics.metrics_error(("10.0.0.1", 1237), False) is not None
    assert metrics.metrics_error(("0.0.0.0", 1237), True) is None
    assert metrics.metrics_error(None, False) is None
    assert metrics.metrics_error(None, True) is not None  # public of nothing: a mistake


def test_snapshots_render_with_their_labels_and_parse() -> None:
    h = Histogram()
    for seconds in (0.0001, 0.003, 0.003, 7.0):
        h.observe(seconds)
    sources = [
        (("gateway", "g1"), {"gateway_connections": 3, "gateway_disconnects_total": [["1008", 2]]}),
        (("worker", "w1"), {"worker_callback_seconds": [["message", h.snapshot()]]}),
        (("worker", "w2"), {"not_in_the_catalogue": 1, "worker_query_seconds": h.snapshot()}),
    ]
    text = exposition(SnapshotCollector(lambda: sources)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("gateway_connections", (("id", "g1"), ("role", "gateway")))] == 3
    key = ("gateway_disconnects_total", (("code", "1008"), ("id", "g1"), ("role", "gateway")))
    assert samples[key] == 2
    labels = (("id", "w1"), ("kind", "message"), ("role", "worker"))
    assert samples[("worker_callback_seconds_count", labels)] == 4
    assert (
        samples[("worker_callback_seconds_bucket", (*labels[:2], ("le", "0.0005"), labels[2]))] == 1
    )
    assert (
        samples[("worker_callback_seconds_bucket", (*labels[:2], ("le", "0.005"), labels[2]))] == 3
    )
    assert samples[("worker_query_seconds_count", (("id", "w2"), ("role", "worker")))] == 4
    assert "not_in_the_catalogue" not in text


def test_catalogue_names_follow_the_conventions() -> None:
    for name, spec in CATALOG.items():
        assert name.endswith("_total") == (spec.kind == "counter"), name
        if spec.kind == "histogram":
            assert name.endswith("_seconds"), name
        assert not {"role", "id"} & set(spec.labels), name  # the labels every member has


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    return answer


async def test_the_endpoint_answers_get_and_head_only_and_says_who_may_read() -> None:
    server = MetricsServer(("127.0.0.1", 0), lambda: b"x 1\n", lambda: (False, "no gateway"))
    await server.start()
    try:
        port = server.port
        got = await _ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nx 1\n")
        assert b"Access-Control-Allow-Origin: *\r\n" in got
        head = await _ask(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        health = await _ask(port, b"GET /health HTTP/1.1\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 503") and health.endswith(b"\r\n\r\nno gateway\n")
        assert (await _ask(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _ask(port, b"\xff\xfe\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert await _ask(port, b"GET /" + b"x" * 9000) == b""  # over 8 KiB: closed
    finally:
        server.close()
