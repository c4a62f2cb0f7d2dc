"""The admin page (/admin) in headless Chromium against a real cluster whose register serves
the cluster's metrics: it lists the members, follows connections, draws its charts, and
fits a phone. Waits are Playwright's expectations (facts on the page), never sleeps.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.kit import PHONE, REPO, WebServer, off_loop, start_web, stop_web
from tests.cluster import Cluster, free_port

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
expect = sync_api.expect
ws_client = pytest.importorskip("websockets.sync.client", reason="pip install websockets")

SOME_POINTS = re.compile(r"^([3-9]|\d{2,})$")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """1 gateway, 2 workers; the register serves the cluster's figures."""
    port = free_port()
    c = Cluster(gateways=1, workers=2, register_args=["--metrics", f"127.0.0.1:{port}"])
    c.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    off_loop(c.__enter__)
    try:
        yield c
    finally:
        off_loop(c.__exit__, None, None, None)


@pytest.fixture(scope="module")
def web(cluster: Cluster, output_dir: Path) -> Iterator[WebServer]:
    server = start_web(
        cluster.ws_url(0),
        output_dir / "admin.web.log",
        ["--metrics-url", cluster.metrics_url],  # type: ignore[attr-defined]
    )
    yield server
    assert stop_web(server) == 0, server.log()


def open_admin(chromium: Any, web: WebServer, viewport: dict[str, int], query: str = "") -> Any:
    context = chromium.new_context(viewport=viewport)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(web.url + "admin" + query)
    return page


def test_lists_members_follows_connections_and_draws(
    chromium: Any, web: WebServer, cluster: Cluster, output_dir: Path
) -> None:
    # Charts of the last 20 s refreshed every 0.5 s: they fill within the test.
    page = open_admin(chromium, web, {"width": 1000, "height": 900}, "?window=20&every=0.5")
    try:
        expect(page.locator("#health")).to_have_attribute("data-state", "ok")
        expect(page.locator("#health-text")).to_have_text("ok: 1 gateways, 2 workers")
        expect(page.locator("#gateways .member")).to_have_count(1)
        expect(page.locator("#workers .member")).to_have_count(2)
        gateway_id = cluster.gateway_id(0)
        expect(page.locator("#gateways .member-id")).to_have_text(gateway_id)
        expect(page.locator("#gateways .member")).to_have_attribute("data-state", "up")
        total = page.locator("#total-connections .tile-value")
        expect(total).to_have_text("0")

        with contextlib.ExitStack() as five:
            clients = [five.enter_context(ws_client.connect(cluster.ws_url(0))) for _ in range(5)]
            expect(total).to_have_text("5")
            expect(
                page.locator('#gateways .tile[data-metric="connections"] .tile-value')
            ).to_have_text("5")
            for i, client in enumerate(clients):
                client.send(f'{{"type":"login","name":"admin{i}","room":"admin"}}')
            chart = page.locator("#total-connections svg")
            expect(chart).to_have_attribute("data-points", SOME_POINTS)
            # Some chatting for the picture, until the chart holds 12 points (6 s; for the
            # README's picture 36, nearly the whole 20 s window).
            enough = 36 if os.environ.get("CHAT_UPDATE_SCREENSHOT") == "1" else 12
            n = 0
            while (points := int(chart.get_attribute("data-points") or 0)) < enough:
                clients[n % 5].send(f'{{"type":"say","to_uid":"all","content":"line {n}"}}')
                for client in clients:  # each reads the say: nobody is a slow consumer
                    while '"say"' not in client.recv(timeout=10):
                        pass
                n += 1
                expect(chart).not_to_have_attribute("data-points", str(points))  # one a point
            page.evaluate("document.activeElement && document.activeElement.blur()")
            path = output_dir / "admin-screenshot.png"
            page.screenshot(path=str(path), full_page=True)
            if os.environ.get("CHAT_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(path, REPO / "web" / "admin-screenshot.png")
        expect(total).to_have_text("0")
        points = page.locator("#total-connections svg .spark-line").get_attribute("points")
        assert points and len(points.split()) >= 3, points
        assert page.errors == []
    finally:
        page.context.close()


def test_fits_a_phone(chromium: Any, web: WebServer) -> None:
    page = open_admin(chromium, web, PHONE)
    try:
        expect(page.locator("#workers .member")).to_have_count(2)
        expect(page.locator("#total-in svg")).to_have_attribute("data-points", SOME_POINTS)
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        assert page.errors == []
    finally:
        page.context.close()
