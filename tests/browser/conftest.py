"""Fixtures for the browser tests: a real cluster, `python -m web`, and Debian's headless Chromium.

Every test in this folder carries the `browser` marker. Chromium is Debian's /usr/bin/chromium
driven by Playwright (never a downloaded browser); without it the tests are skipped.

Playwright's sync API marks its event loop as running in the main thread between calls, so the
browser lives for one test module only (not the whole session, where it would break asyncio
tests that run later), and cluster calls run in a helper thread (see `kit.off_loop`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).resolve().parent.parent.parent
if str(_REPO) not in sys.path:  # `web`, `tests.cluster` and `tests.browser.kit` import from here
    sys.path.insert(0, str(_REPO))

from tests.browser.kit import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    HERE,
    OUTPUT_DIR,
    Pages,
    WebServer,
    off_loop,
    slug,
    start_web,
    stop_web,
)


def pytest_configure(config: pytest.Config) -> None:
    """Declare the marker (also fine if pyproject declares it too)."""
    config.addinivalue_line("markers", "browser: tests that drive a real headless Chromium")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the `browser` marker on every test of this folder."""
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's report on the item so fixtures can see whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """tests/browser/output/, created on demand."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Debian Chromium per test module."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install --no-install-recommends chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        sync_api.expect.set_options(timeout=10_000)
        yield browser
        browser.close()


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A real cluster (register, one gateway, two chat workers) on free loopback ports."""
    try:
        from tests.cluster import Cluster
    except ImportError:
        try:
            from cluster import Cluster  # tests/ itself on sys.path
        except ImportError as exc:
            pytest.skip(f"tests/cluster.py is not available: {exc}")
    c = Cluster(gateways=1, workers=2, app="businessworker.chat")
    off_loop(c.__enter__)
    try:
        yield c
    finally:
        off_loop(c.__exit__, None, None, None)


@pytest.fixture
def web(cluster: Any, output_dir: Path, request: pytest.FixtureRequest) -> Iterator[WebServer]:
    """`python -m web --ws-url <gateway 0>` on a free port; must stop cleanly on SIGTERM."""
    server = start_web(cluster.ws_url(0), output_dir / f"{slug(request.node.name)}.web.log")
    yield server
    assert stop_web(server) == 0, server.log()


@pytest.fixture
def pages(
    chromium: Any, web: WebServer, output_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Pages]:
    """Page factory; on failure every open page is saved as a screenshot in the output folder."""
    factory = Pages(chromium, web.url)
    yield factory
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for i, page in enumerate(factory.all_pages()):
            page.screenshot(path=str(output_dir / f"FAILED-{slug(request.node.name)}-{i}.png"))
    for context in factory.contexts:
        context.close()
