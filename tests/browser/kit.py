"""Helpers shared by the browser tests: the web server process and the chat page driver."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUTPUT_DIR = HERE / "output"  # screenshots and logs of each run (git-ignored)
CHROMIUM = Path(os.environ.get("CHAT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1000, "height": 640}
PHONE = {"width": 375, "height": 667}

T = TypeVar("T")


def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call in a helper thread, out of reach of Playwright's event loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


def slug(text: str) -> str:
    """A file-name-safe version of a test id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120]


@dataclass
class WebServer:
    """A running `python -m web`."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        """What the server logged so far."""
        return self.log_path.read_text(errors="replace")


def start_web(ws_url: str | None, log_path: Path, extra: list[str] | None = None) -> WebServer:
    """Start `python -m web` on a free port (--port 0) and read the port from its log."""
    cmd = [sys.executable, "-m", "web", "--host", "127.0.0.1", "--port", "0"]
    if ws_url:
        cmd += ["--ws-url", ws_url]
    cmd += extra or []
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        match = re.search(r"on (http://127\.0\.0\.1:\d+/)", log_path.read_text(errors="replace"))
        if match:
            return WebServer(proc, match.group(1), log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"python -m web did not start:\n{log_path.read_text(errors='replace')}")


def stop_web(server: WebServer) -> int:
    """SIGTERM the server and return its exit code."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        raise


@dataclass
class Pages:
    """Opens chat pages, each in its own browser context (like separate browsers)."""

    browser: Any
    base_url: str
    contexts: list[Any] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self, viewport: dict[str, int] | None = None, query: str = "") -> Any:
        """A new page on the chat, its login form showing."""
        context = self.browser.new_context(viewport=viewport or DESKTOP)
        self.contexts.append(context)
        page = context.new_page()
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.goto(self.base_url + query)
        page.get_by_label("Nickname").wait_for()
        return page

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def login(self, page: Any, name: str, room: str = "") -> None:
        """Fill the login form and wait until the page is logged in and knows itself."""
        from playwright.sync_api import expect

        page.get_by_label("Nickname").fill(name)
        page.get_by_label("Room").fill(room)
        page.get_by_role("button", name="Join").click()
        expect(page.locator("#status")).to_have_attribute("data-state", "online")
        expect(page.locator("#users .user-self .user-name")).to_have_text(name)

    def say(self, page: Any, text: str, to: str | None = None) -> None:
        """Choose the recipient (a user's name, None for everyone), type the text, press Enter."""
        recipient = page.get_by_label("To", exact=True)
        if to is None:
            recipient.select_option("all")
        else:
            recipient.select_option(label=to)
        box = page.get_by_label("Message", exact=True)
        box.fill(text)
        box.press("Enter")

    def all_pages(self) -> list[Any]:
        """Every page still open."""
        return [p for c in self.contexts for p in c.pages if not p.is_closed()]
