"""`python -m web`: static files only, content types, caching, no path escape, clean stop.

Plain HTTP: no browser and no cluster, so not under tests/browser/ (whose `browser` marker
means a test drives Chromium). The server process is started as the browser tests start it.
"""

from __future__ import annotations

import http.client
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.kit import WebServer, start_web, stop_web
from web.server import STATIC_ROOT, ChatWebServer, resolve_static

WS_URL = "ws://127.0.0.1:1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """One server for the module, checked to stop with exit code 0."""
    srv = start_web(WS_URL, tmp_path_factory.mktemp("web") / "web.log")
    yield srv
    assert stop_web(srv) == 0, srv.log()


def request(
    server: WebServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send one request with the path exactly as given (no client-side normalisation)."""
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("path", "content_type", "needle"),
    [
        ("/", "text/html; charset=utf-8", b'<script type="module" src="app.js">'),
        ("/index.html", "text/html; charset=utf-8", b"<!doctype html>"),
        ("/app.js", "text/javascript; charset=utf-8", b"import"),
        ("/protocol.js", "text/javascript; charset=utf-8", b"export function parseMessage"),
        ("/connection.js", "text/javascript; charset=utf-8", b"backoffDelay"),
        ("/view.js", "text/javascript; charset=utf-8", b"textContent"),
        ("/style.css", "text/css; charset=utf-8", b":root"),
        ("/icon.svg", "image/svg+xml", b"<svg"),
        ("/app.js?v=1", "text/javascript; charset=utf-8", b"import"),
    ],
)
def test_serves_static_files_with_types_and_validators(
    server: WebServer, path: str, content_type: str, needle: bytes
) -> None:
    status, headers, body = request(server, path)
    assert status == 200
    assert headers["content-type"] == content_type
    assert needle in body
    assert int(headers["content-length"]) == len(body)
    assert headers["etag"].startswith('"')
    assert "last-modified" in headers
    assert headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "Python" not in headers.get("server", "")


def test_config_js_carries_the_ws_url(server: WebServer) -> None:
    status, headers, body = request(server, "/config.js")
    assert status == 200
    assert headers["content-type"].startswith("text/javascript")
    assert f'"wsUrl": "{WS_URL}"'.encode() in body
    assert body.decode().count("export default") == 1


def test_conditional_requests_answer_304(server: WebServer) -> None:
    _, headers, _ = request(server, "/app.js")
    status, h304, body = request(server, "/app.js", headers={"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")
    assert h304["etag"] == headers["etag"]
    weak = "W/" + headers["etag"]
    assert request(server, "/app.js", headers={"If-None-Match": f'"x", {weak}'})[0] == 304
    assert request(server, "/app.js", headers={"If-None-Match": '"other"'})[0] == 200
    since = {"If-Modified-Since": headers["last-modified"]}
    assert request(server, "/app.js", headers=since)[0] == 304
    old = {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}
    assert request(server, "/app.js", headers=old)[0] == 200
    _, cfg, _ = request(server, "/config.js")
    assert request(server, "/config.js", headers={"If-None-Match": cfg["etag"]})[0] == 304


def test_head_has_headers_and_no_body(server: WebServer) -> None:
    status, headers, body = request(server, "/style.css", method="HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["content-length"]) > 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_refused(server: WebServer, method: str) -> None:
    status, headers, _ = request(server, "/", method=method)
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "path",
    [
        "/../server.py",
        "/../../../../etc/passwd",
        "/%2e%2e/server.py",
        "/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
        "/..%2fserver.py",
        "/%2e%2e%2fserver.py",
        "/.%2e/__main__.py",
        "/static/../server.py",
        "/..\\server.py",
        "/%5c..%5cserver.py",
        "//etc/passwd",
        "/%2fetc%2fpasswd",
        "/etc/passwd",
        "http://127.0.0.1/../server.py",
        "/app.js%00.html",
        "/%252e%252e/server.py",
        "/.hidden",
        "/nope.js",
        "/static/",
        "/%ff%fe",
    ],
)
def test_no_path_escape_and_no_listing(server: WebServer, path: str) -> None:
    status, headers, body = request(server, path)
    assert status == 404, path
    assert headers["content-type"].startswith("text/plain")
    assert b"root:" not in body and b"import" not in body


def test_directory_is_never_listed(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / "index.html").write_text("i")
    assert resolve_static(tmp_path, "/sub") is None
    assert resolve_static(tmp_path, "/sub/") is None
    assert resolve_static(tmp_path, "/sub/a.txt") == (tmp_path / "sub" / "a.txt").resolve()
    assert resolve_static(tmp_path, "/") == (tmp_path / "index.html").resolve()


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert resolve_static(root, "/link.txt") is None
    assert resolve_static(STATIC_ROOT, "/index.html") == STATIC_ROOT / "index.html"


def test_logs_quietly_at_info(server: WebServer) -> None:
    request(server, "/")
    request(server, "/nope")
    log = server.log()
    assert "level=INFO logger=web serving" in log
    assert "GET" not in log and "Traceback" not in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_signals(tmp_path: Path, signum: signal.Signals) -> None:
    srv = start_web(None, tmp_path / "web.log")
    # An idle keep-alive connection must not hold the stop up.
    host, port = srv.url.removeprefix("http://").rstrip("/").split(":")
    idle = socket.create_connection((host, int(port)))
    try:
        # Without --ws-url the page falls back to ws://<page host>:7272.
        assert b'"wsUrl": null' in request(srv, "/config.js")[2]
        srv.proc.send_signal(signum)
        assert srv.proc.wait(10) == 0
    finally:
        idle.close()
    log = srv.log()
    assert f"got {signum.name}, stopping" in log and "stopped" in log
    assert "Traceback" not in log


def test_rejects_a_bad_ws_url(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="must start with ws://"):
        start_web("http://127.0.0.1:7272", tmp_path / "web.log")


@pytest.mark.parametrize(
    ("bound", "url"),
    [
        (("0.0.0.0", 55151), "http://127.0.0.1:55151/"),
        (("::", 55151, 0, 0), "http://[::1]:55151/"),
        (("127.0.0.2", 8080), "http://127.0.0.2:8080/"),
    ],
)
def test_the_logged_url_is_one_to_open(bound: tuple, url: str) -> None:
    """Bound to every interface, the server gives this machine's loopback URL, not
    http://0.0.0.0:... (no socket is bound here: only the URL is computed)."""
    server = ChatWebServer.__new__(ChatWebServer)
    server.server_address = bound
    assert server.url == url
    assert server.every_interface == (bound[0] in ("0.0.0.0", "::"))


def test_admin_is_the_admin_page_and_config_names_the_metrics(server: WebServer) -> None:
    status, headers, body = request(server, "/admin")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="admin.js"' in body
    assert request(server, "/admin.js")[0] == 200
    # The admin page reads the metrics endpoint, another origin: http: is a connect-src.
    assert "connect-src 'self' ws: wss: http: https:" in headers["content-security-policy"]
    assert b'"metricsUrl": null' in request(server, "/config.js")[2]
