"""The page against a scripted WebSocket server: `?ws=` override, server errors, odd frames.

The scripted server sends what the real cluster would only send in rare cases (a refused login,
an error after a say, frames the page does not know), so the page's handling of them is tested
without depending on the cluster's validation rules.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.kit import Pages, slug, start_web, stop_web

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
expect = sync_api.expect
ws_server = pytest.importorskip("websockets.sync.server", reason="pip install websockets")

UID = 4242


def now() -> str:
    """A fixed server time."""
    return "2014-08-12 17:51:02"


def scripted(ws: Any) -> None:
    """Refuse the name `taken`; answer `boom` with an error; `junk` with frames to ignore."""
    name = None
    for raw in ws:
        msg = json.loads(raw)
        if msg["type"] == "login":
            if msg["name"] == "taken":
                ws.send(json.dumps({"type": "error", "code": "bad_name", "message": "name taken"}))
                continue
            name = msg["name"]
            user_list = [{"uid": 1, "name": "other"}, {"uid": UID, "name": name}]
            ws.send(json.dumps({"type": "user_list", "user_list": user_list}))
            ws.send(json.dumps({"type": "login", "uid": UID, "name": name, "time": now()}))
        elif msg["type"] == "say" and msg["content"] == "boom":
            error = {"type": "error", "code": "content_too_long", "message": "content too long"}
            ws.send(json.dumps(error))
        elif msg["type"] == "say" and msg["content"] == "junk":
            for frame in (
                "not json",
                "[1, 2]",
                '{"type": "weird", "content": "<b>x</b>"}',
                '{"type": "say", "from_uid": "1", "to_uid": "all", "content": "bad uid"}',
                '{"type": "login", "uid": -1, "name": "neg"}',
            ):
                ws.send(frame)
            ws.send(b"\x00binary")
            say = {"type": "say", "from_uid": 1, "to_uid": "all", "content": "after junk"}
            ws.send(json.dumps({**say, "time": "garbage"}))
        elif msg["type"] == "say":
            say = {"type": "say", "from_uid": UID, "to_uid": msg["to_uid"]}
            ws.send(json.dumps({**say, "content": msg["content"], "time": now()}))


@pytest.fixture
def fake_ws() -> Iterator[str]:
    """The scripted server on a free loopback port, in a thread."""
    server = ws_server.serve(scripted, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.socket.getsockname()[1]
    yield f"ws://127.0.0.1:{port}"
    server.shutdown()
    thread.join(5)


@pytest.fixture
def fake_pages(
    chromium: Any, fake_ws: str, output_dir: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Pages, str]]:
    """Pages from a web server whose --ws-url is a dead port, opened with `?ws=<scripted>`."""
    web = start_web("ws://127.0.0.1:9", output_dir / f"{slug(request.node.name)}.web.log")
    factory = Pages(chromium, web.url)
    yield factory, f"?ws={fake_ws}"
    for context in factory.contexts:
        context.close()
    assert stop_web(web) == 0


def test_ws_parameter_wins_and_a_refused_login_returns_to_the_form(
    fake_pages: tuple[Pages, str],
) -> None:
    pages, query = fake_pages
    page = pages.open(query=query)
    expect(page.locator("#server-url")).to_have_text(query.removeprefix("?ws="))
    page.get_by_label("Nickname").fill("taken")
    page.get_by_label("Nickname").press("Enter")
    expect(page.locator("#login-error")).to_contain_text("name taken")
    expect(page.locator("#login-error")).to_contain_text("bad_name")
    expect(page.get_by_label("Nickname")).to_be_focused()
    expect(page.locator("#chat-view")).to_be_hidden()
    expect(page.locator("#status")).to_have_attribute("data-state", "idle")

    pages.login(page, "fine")
    expect(page.locator("#user-count")).to_have_text("2")
    assert not pages.errors


def test_server_errors_are_shown_and_unknown_frames_ignored(fake_pages: tuple[Pages, str]) -> None:
    pages, query = fake_pages
    page = pages.open(query=query)
    pages.login(page, "me")

    pages.say(page, "boom")
    error = page.locator(".msg-error")
    expect(error).to_have_count(1)
    expect(error.locator(".msg-tag")).to_have_text("error")
    expect(error.locator(".msg-text")).to_have_text("content too long (content_too_long)")
    expect(page.locator("#composer-status")).to_have_text("content too long")
    expect(page.locator("#status")).to_have_attribute("data-state", "online")

    pages.say(page, "junk")
    said = page.locator(".msg-say")
    expect(said).to_have_count(1)
    expect(said.locator(".msg-from")).to_have_text("other")
    expect(said.locator(".msg-text")).to_have_text("after junk")
    expect(page.locator("#messages")).not_to_contain_text("weird")
    expect(page.locator("#messages")).not_to_contain_text("bad uid")
    expect(page.locator("#user-count")).to_have_text("2")

    pages.say(page, "still here")
    expect(said.last.locator(".msg-text")).to_have_text("still here")
    expect(said.last.locator(".msg-time")).to_have_text("17:51:02")
    expect(said.last.locator(".msg-time")).to_have_attribute("datetime", "2014-08-12 17:51:02")
    assert not pages.errors and not pages.dialogs


def test_leave_closes_the_connection_and_shows_the_form(fake_pages: tuple[Pages, str]) -> None:
    pages, query = fake_pages
    page = pages.open(query=query)
    pages.login(page, "me")
    page.get_by_role("button", name="Leave").click()
    expect(page.get_by_label("Nickname")).to_be_visible()
    expect(page.get_by_label("Nickname")).to_have_value("me")  # remembered for next time
    expect(page.locator("#status")).to_have_attribute("data-state", "idle")
