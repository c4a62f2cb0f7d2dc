"""The chat page in headless Chromium against a real cluster (gateway + chat workers)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.browser.kit import PHONE, REPO, Pages, off_loop

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
expect = sync_api.expect

TIME = re.compile(r"^\d{2}:\d{2}:\d{2}$")


def room() -> str:
    """A room of its own for a test, so users of other tests never show up."""
    return "t-" + uuid.uuid4().hex[:8]


def names(page: Any) -> Any:
    """The names in the online list."""
    return page.locator("#users .user-name")


def test_seed_scenario_two_browsers(pages: Pages, output_dir: Path) -> None:
    """The documented capture: a second browser logs in as mynick and says `hi, all !`."""
    p2 = pages.open()
    pages.login(p2, "猪猪")
    p1 = pages.open()
    pages.login(p1, "mynick")

    for page in (p1, p2):
        expect(names(page)).to_have_text(["猪猪", "mynick"])
        expect(page.locator("#user-count")).to_have_text("2")
    # The earlier user is told about the newcomer.
    expect(p2.locator(".msg-login .msg-from")).to_have_text(["猪猪", "mynick"])
    expect(p2.locator(".msg-login").last.locator(".msg-tag")).to_have_text("joined")

    pages.say(p1, "hi, all !")
    for page in (p1, p2):
        said = page.locator(".msg-say")
        expect(said).to_have_count(1)
        expect(said.locator(".msg-from")).to_have_text("mynick")
        expect(said.locator(".msg-text")).to_have_text("hi, all !")
        expect(said.locator(".msg-time")).to_have_text(TIME)
    expect(p1.locator(".msg-say")).to_have_class(re.compile(r"\bmsg-mine\b"))

    p1.screenshot(path=str(output_dir / "two-users.png"))

    p2.context.close()
    left = p1.locator(".msg-logout")
    expect(left).to_have_count(1)
    expect(left.locator(".msg-from")).to_have_text("猪猪")
    expect(left.locator(".msg-tag")).to_have_text("left")
    expect(p1.locator("#user-count")).to_have_text("1")
    expect(names(p1)).to_have_text(["mynick"])
    assert not pages.dialogs and not pages.errors


def test_private_message_reaches_only_the_recipient(pages: Pages) -> None:
    """A private say shows for the sender and the chosen user, and not for a third user."""
    r = room()
    alice, bob, carol = pages.open(), pages.open(), pages.open()
    pages.login(alice, "alice", r)
    pages.login(bob, "bob", r)
    pages.login(carol, "carol", r)
    expect(alice.locator("#user-count")).to_have_text("3")

    pages.say(alice, "psst, only for bob", to="bob")
    for page, to_text in ((bob, "to you"), (alice, "to bob")):
        private = page.locator(".msg-private")
        expect(private).to_have_count(1)
        expect(private.locator(".msg-tag")).to_have_text("private")
        expect(private.locator(".msg-from")).to_have_text("alice")
        expect(private.locator(".msg-to")).to_have_text(to_text)
        expect(private.locator(".msg-text")).to_have_text("psst, only for bob")

    # A public message sent afterwards reaches carol; the private one never did.
    pages.say(alice, "hello everyone")
    for page in (alice, bob, carol):
        expect(page.locator(".msg-say").last.locator(".msg-text")).to_have_text("hello everyone")
    expect(carol.locator(".msg-say")).to_have_count(1)
    expect(carol.locator(".msg-private")).to_have_count(0)
    expect(carol.locator("#messages")).not_to_contain_text("psst")

    # Choosing a user in the online list makes them the recipient.
    carol.locator("#users button", has_text="alice").click()
    expect(carol.get_by_label("To", exact=True)).to_have_value(re.compile(r"^\d+$"))
    expect(carol.get_by_label("Message", exact=True)).to_be_focused()
    carol.get_by_label("Message", exact=True).fill("hi alice")
    carol.keyboard.press("Enter")
    expect(alice.locator(".msg-private").last.locator(".msg-text")).to_have_text("hi alice")
    expect(bob.locator(".msg-private")).to_have_count(1)


def test_names_and_messages_are_text_not_html(pages: Pages) -> None:
    """Markup in names and messages is shown literally and never runs."""
    r = room()
    evil_name = "<img src=x onerror=alert(1)>"
    evil_name2 = "<svg onload=window.__xss=1>"
    evil_text = (
        '<img src=x onerror="window.__xss=2;alert(2)"><script>window.__xss=3</script><b>b</b>'
    )
    watcher = pages.open()
    pages.login(watcher, evil_name2, r)
    attacker = pages.open()
    pages.login(attacker, evil_name, r)
    pages.say(attacker, evil_text)

    for page in (watcher, attacker):
        expect(names(page)).to_have_text([evil_name2, evil_name])
        expect(page.locator(".msg-login .msg-from")).to_contain_text([evil_name])
        said = page.locator(".msg-say")
        expect(said.locator(".msg-from")).to_have_text(evil_name)
        expect(said.locator(".msg-text")).to_have_text(evil_text)
        expect(page.get_by_label("To", exact=True).locator("option")).not_to_have_count(0)
        assert (
            page.locator("#messages img, #messages svg, #messages script, #messages b").count() == 0
        )
        assert page.locator("#users img, #users svg, #to img").count() == 0
        assert page.evaluate("window.__xss") is None
    assert pages.dialogs == []
    assert pages.errors == []


def test_reconnects_after_gateway_restart(pages: Pages, cluster: Any) -> None:
    """The gateway goes away and comes back: the page logs in again by itself and chats."""
    r = room()
    alice, bob = pages.open(), pages.open()
    pages.login(alice, "alice", r)
    pages.login(bob, "bob", r)
    expect(alice.locator("#user-count")).to_have_text("2")

    off_loop(cluster.stop_gateway, 0)
    for page in (alice, bob):
        expect(page.locator("#status")).not_to_have_attribute("data-state", "online")
        expect(page.locator(".msg-system").last).to_contain_text("Connection lost")
        expect(page.locator("#users")).to_have_class(re.compile(r"\bis-stale\b"))
    # Typing while offline keeps the text and says why nothing was sent.
    pages.say(alice, "are you there?")
    expect(alice.locator("#composer-status")).to_contain_text("Not connected")
    expect(alice.get_by_label("Message", exact=True)).to_have_value("are you there?")

    off_loop(cluster.start_gateway, 0)
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_attribute("data-state", "online", timeout=20_000)
        expect(page.locator("#status")).to_contain_text("Connected")
        expect(page.locator("#user-count")).to_have_text("2")
        expect(names(page)).to_have_count(2)
        expect(page.locator("#users")).to_contain_text("alice")
        expect(page.locator("#users")).to_contain_text("bob")
        expect(page.locator("#users")).not_to_have_class(re.compile(r"\bis-stale\b"))
        expect(page.locator(".msg-system").last).to_contain_text("Reconnected")

    alice.get_by_label("Message", exact=True).press("Enter")  # the kept text goes out now
    pages.say(bob, "back again")
    for page in (alice, bob):
        expect(page.locator(".msg-say .msg-text")).to_have_text(["are you there?", "back again"])
    assert not pages.errors


def test_phone_layout_and_keyboard_only(pages: Pages, output_dir: Path) -> None:
    """375x667: no sideways scrolling, everything reachable; the keyboard alone is enough."""
    r = room()
    other = pages.open()
    pages.login(other, "desk", r)
    phone = pages.open(viewport=PHONE)

    # The nickname field has focus; Tab walks to the room, then the Join button.
    expect(phone.get_by_label("Nickname")).to_be_focused()
    phone.keyboard.type("pocket")
    phone.keyboard.press("Tab")
    expect(phone.get_by_label("Room")).to_be_focused()
    phone.keyboard.type(r)
    phone.keyboard.press("Tab")
    expect(phone.get_by_role("button", name="Join")).to_be_focused()
    phone.keyboard.press("Enter")
    expect(phone.locator("#status")).to_have_attribute("data-state", "online")
    expect(phone.locator("#user-count")).to_have_text("2")

    # Focus lands in the message box; Shift+Enter adds a line, Enter sends.
    box = phone.get_by_label("Message", exact=True)
    expect(box).to_be_focused()
    phone.keyboard.type("line one")
    phone.keyboard.press("Shift+Enter")
    phone.keyboard.type("line two")
    phone.keyboard.press("Enter")
    for page in (phone, other):
        expect(page.locator(".msg-say .msg-text")).to_have_text("line one\nline two")
    expect(box).to_have_value("")

    # New messages are announced; the list and the composer fit the screen.
    expect(phone.locator("#messages")).to_have_attribute("aria-live", "polite")
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    for selector in ("#users", "#messages", "#to", "#message", "#send", "#status"):
        box_ = phone.locator(selector).bounding_box()
        assert box_ is not None, selector
        assert box_["x"] >= 0 and box_["x"] + box_["width"] <= PHONE["width"] + 0.5, selector
        assert box_["y"] >= 0 and box_["y"] + box_["height"] <= PHONE["height"] + 0.5, selector

    # Shift+Tab from the message box reaches the recipient choice.
    box.focus()
    phone.keyboard.press("Shift+Tab")
    expect(phone.get_by_label("To", exact=True)).to_be_focused()
    phone.screenshot(path=str(output_dir / "phone.png"))


def test_backoff_is_capped_exponential_with_full_jitter(pages: Pages) -> None:
    """connection.js: delay = random * min(10 s, 0.5 s * 2^attempt)."""
    page = pages.open()
    delays = page.evaluate(
        """async () => {
            const { backoffDelay } = await import("/connection.js");
            const top = () => 0.999999;
            return {
                top: [0, 1, 2, 3, 4, 5, 10, 60].map((a) => backoffDelay(a, 500, 10000, top)),
                zero: backoffDelay(3, 500, 10000, () => 0),
                spread: new Set(Array.from({ length: 50 }, () => backoffDelay(4))).size,
            };
        }"""
    )
    assert delays["top"] == [499, 999, 1999, 3999, 7999, 9999, 9999, 9999]
    assert delays["zero"] == 0
    assert delays["spread"] > 10


def test_readme_screenshot(pages: Pages, output_dir: Path) -> None:
    """The README picture: two users chatting. CHAT_UPDATE_SCREENSHOT=1 also writes web/."""
    pig = pages.open()
    pages.login(pig, "猪猪")
    me = pages.open(viewport={"width": 960, "height": 600})
    pages.login(me, "mynick")
    pages.say(me, "hi, all !")
    pages.say(pig, "hello mynick, welcome!\nThe page keeps new lines.")
    pages.say(pig, "this one is just for you", to="mynick")
    pages.say(me, "got it, thanks", to="猪猪")
    expect(me.locator(".msg-say")).to_have_count(4)
    me.evaluate("document.activeElement.blur()")
    path = output_dir / "readme-screenshot.png"
    me.screenshot(path=str(path))
    if os.environ.get("CHAT_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, REPO / "web" / "screenshot.png")
