"""The page carries on through the death of its gateway: nothing missed, nobody left."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.kit import Pages, off_loop
from tests.browser.test_browser_chat import names, room

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
expect = sync_api.expect


@pytest.fixture
def cluster() -> Iterator[Any]:
    """Two gateways (the page server points at gateway 0) and two chat workers."""
    from tests.cluster import Cluster

    c = Cluster(gateways=2, workers=2, app="businessworker.chat")
    off_loop(c.__enter__)
    try:
        yield c
    finally:
        off_loop(c.__exit__, None, None, None)


def test_page_recovers_what_it_missed_when_its_gateway_dies(pages: Pages, cluster: Any) -> None:
    """Page A's gateway is SIGKILLed (and restarted, as supervisor would); page B, on the
    other gateway, says 3 messages meanwhile. A shows all 3 in order, once, within 15 s;
    neither page shows anyone leave or join; both list exactly the two users."""
    r = room()
    alice = pages.open()
    bob = pages.open(query=f"?ws={cluster.ws_url(1)}")
    pages.login(alice, "alice", r)
    pages.login(bob, "bob", r)
    for page in (alice, bob):
        expect(page.locator("#user-count")).to_have_text("2")
    joined = {id(page): page.locator(".msg-login").count() for page in (alice, bob)}

    off_loop(cluster.kill_gateway, 0)
    expect(alice.locator("#status")).not_to_have_attribute("data-state", "online")
    expect(alice.locator(".msg-system").last).to_contain_text("Reconnecting")
    for text in ("one", "two", "three"):
        pages.say(bob, text)
    expect(bob.locator(".msg-say .msg-text")).to_have_text(["one", "two", "three"])
    off_loop(cluster.start_gateway, 0)

    expect(alice.locator(".msg-say .msg-text")).to_have_text(
        ["one", "two", "three"], timeout=15_000
    )
    expect(alice.locator("#status")).to_have_attribute("data-state", "online")
    expect(alice.locator(".msg-system").last).to_contain_text("Reconnected")
    pages.say(bob, "marker")  # everything before it has reached both pages once it shows
    for page in (alice, bob):
        expect(page.locator(".msg-say .msg-text").last).to_have_text("marker")
        expect(page.locator(".msg-say .msg-text")).to_have_text(["one", "two", "three", "marker"])
        expect(page.locator(".msg-logout")).to_have_count(0)
        expect(page.locator(".msg-login")).to_have_count(joined[id(page)])
        expect(names(page)).to_have_count(2)
        expect(page.locator("#users")).to_contain_text("alice")
        expect(page.locator("#users")).to_contain_text("bob")
        expect(page.locator("#users")).not_to_have_class(re.compile(r"\bis-stale\b"))
        expect(page.locator(".msg-system", has_text=re.compile(r"code \d"))).to_have_count(0)
    assert not pages.errors
