"""The WebSocket opening handshake, server side, sans I/O (RFC 6455 section 4.2).

Why by hand: websockets' generic path (a line-by-line generator parser, a
``Headers`` object, ``accept()`` negotiating extensions and subprotocols,
``send_response()`` serialising a ``Response``) costs about 72 us of Python per
connection in the gateway. Microbenchmark, best of 15 runs on one core: a
13-field browser request takes 10 us here against 54 us through
``ServerProtocol`` (construct, ``receive_data``, ``events_received``,
``accept``, ``send_response``, ``data_to_send``); a 5-field websockets client
request 6.5 us against 38 us. Once the 101 response is written, the connection
continues in ``ServerProtocol(state=State.OPEN, max_size=...)``, which parses
frames and runs the closing handshake as before.

Strict by design: CRLF line endings only, no obs-fold, no control characters,
header section at most 16 KiB and 128 fields, GET with HTTP/1.1, exactly one
``Host``, ``Sec-WebSocket-Key`` and ``Sec-WebSocket-Version``, no body. No
extension and no subprotocol is ever negotiated. Field values are decoded as
ISO-8859-1, as websockets does, so obs-text round-trips byte for byte.
"""

from __future__ import annotations

import email.utils
import re
from binascii import b2a_base64
from dataclasses import dataclass
from hashlib import sha1
from http import HTTPStatus

from gateway.metrics import COUNTS

__all__ = [
    "MAX_FIELDS",
    "MAX_HEAD",
    "Accepted",
    "HandshakeParser",
    "Refused",
    "accept_key",
    "refuse",
]

MAX_HEAD = 16 * 1024
"""Bytes from the request line up to and including the blank line."""
MAX_FIELDS = 128
"""Header fields in the request."""

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TERMINATOR = b"\r\n\r\n"
_RESPONSE_HEAD = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)

_TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
# Patterns run on text decoded as ISO-8859-1, so one character is one byte.
_REQUEST_LINE = re.compile(rf"([{_TCHAR}]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# A header line, once every line is known to end with CRLF and to hold no
# other CR, LF or control character: name, colon, OWS, a value that ends with
# a visible character (or is empty), OWS, CR. ``^`` and ``$`` (re.M) anchor
# each match to one line; ``.`` stops at LF.
_FIELD = re.compile(rf"^([{_TCHAR}]+):[ \t]*((?:.*[!-~\x80-\xff])?)[ \t]*\r$", re.M)
_TEXT = bytes((9, *range(0x20, 0x7F), *range(0x80, 0x100)))
"""Bytes allowed in a request head besides CR and LF: HTAB, SP, VCHAR, obs-text."""
_TEXT_CRLF = _TEXT + b"\r\n"
_BAD_BYTES = "control character, bare CR or bare LF in the request"
_BAD_LINE = "invalid HTTP request line"
_CRLFS = b"\r\n" * (MAX_HEAD // 2)
"""What is left of a valid head once ``_TEXT`` is deleted, sliced to length."""
_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")
"""Base64 of 16 bytes (what ``b64decode(validate=True)`` turns into 16 bytes)."""
_HOST = re.compile(r"(?:\[[0-9A-Za-z:.]+\]|[-0-9A-Za-z._~!$&'()*+,;=%]+)(?::[0-9]*)?")
"""RFC 9110 section 7.2: uri-host [":" port], the host non-empty."""

_CHECKED = frozenset(
    (
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "transfer-encoding",
        "content-length",
    )
)
_LISTS = frozenset(("upgrade", "connection", "content-length"))
"""Fields whose repeated lines combine into one comma-separated list."""
_REPEATED = "\n"
"""Stands for a singleton field sent more than once (no value contains LF)."""

_CLOSE = "Connection: close\r\n"
_EXTRA_HEADERS = {
    405: "Allow: GET\r\n" + _CLOSE,
    # RFC 9110 7.8: a 426 names the protocol to upgrade to, and whoever sends
    # Upgrade also sends the "upgrade" connection option.
    426: "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nConnection: Upgrade, close\r\n",
}


@dataclass(slots=True)
class Accepted:
    """A valid opening handshake: write ``response``, then speak WebSocket."""

    path: str
    """The request target as sent, query string included."""
    headers: list[tuple[str, str]]
    """(name as sent, value without surrounding whitespace), in order received."""
    response: bytes
    """The complete 101 response."""
    leftover: bytes
    """Bytes received after the request: the client's first frames, if any."""


@dataclass(slots=True)
class Refused:
    """Not a valid opening handshake: write ``response``, then close."""

    status: int
    response: bytes
    """A complete HTTP error response with a short plain-text body."""
    reason: str
    """A short explanation for a log line (also the response body)."""


def accept_key(key: str | bytes) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key`` value."""
    raw = key.encode("ascii") if isinstance(key, str) else key
    return b2a_base64(sha1(raw + GUID).digest(), newline=False).decode("ascii")


def refuse(status: int, reason: str) -> Refused:
    """Build a refusal: ``status``, ``reason`` in the body, ``Connection: close``.

    Public so that the caller can refuse with the same format for reasons of
    its own (a handshake timeout, 408; overload, 503).
    """
    body = f"Failed to open a WebSocket connection: {reason}.\n".encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"{_EXTRA_HEADERS.get(status, _CLOSE)}"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    COUNTS.refusals[status] += 1
    return Refused(status, head.encode("ascii") + body, reason)


class HandshakeParser:
    """Parse one client's opening handshake from the bytes it sends.

    Call :meth:`feed` with each chunk received until it returns an outcome;
    ``None`` means the request is not complete yet. Holds at most
    :data:`MAX_HEAD` bytes plus the last chunk.
    """

    __slots__ = ("_buf", "_done", "_line_checked", "_scanned")

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""
        self._scanned = 0
        """Length of ``_buf`` already checked (no terminator, no bad byte)."""
        self._line_checked = False
        self._done = False

    def feed(self, data: bytes) -> Accepted | Refused | None:
        """Add received bytes; return the outcome once there is one."""
        if self._done:
            raise RuntimeError("the handshake is already decided")
        buf = self._buf
        if buf:
            buf += data  # a bytearray, extended in place
        else:
            buf = data
        end = buf.find(_TERMINATOR, max(self._scanned - 3, 0), MAX_HEAD)
        if end < 0:
            return self._incomplete(buf)
        self._done = True
        self._buf = b""
        return _decide(buf, end)

    def _incomplete(self, buf: bytes | bytearray) -> Refused | None:
        """Check what arrived so far; keep it unless it is already refused.

        Garbage (TLS, binary, LF-only lines) is refused now rather than when
        the size limit or the caller's timeout is reached. The checks run in
        the order :func:`_decide` runs them, on the new bytes only, so the
        outcome does not depend on how the request was segmented, and a
        request fed byte by byte costs linear time.
        """
        if not self._line_checked:
            eol = buf.find(b"\r\n", 0, MAX_HEAD)
            if eol >= 0:
                self._line_checked = True
                checked = _check_request_line(buf[:eol].decode("latin-1"))
                if isinstance(checked, Refused):
                    return self._finish(checked)
        old = self._scanned
        if buf[old:MAX_HEAD].translate(None, _TEXT_CRLF) or buf.count(
            b"\n", old, MAX_HEAD
        ) != buf.count(b"\r\n", max(old - 1, 0), MAX_HEAD):
            # Before the first CRLF, the bad byte is in the request line.
            return self._finish(refuse(400, _BAD_BYTES if self._line_checked else _BAD_LINE))
        size = len(buf)
        if size >= MAX_HEAD:
            return self._finish(refuse(431, f"request header section over {MAX_HEAD} bytes"))
        self._scanned = size
        if type(buf) is not bytearray:
            buf = bytearray(buf)
        self._buf = buf
        return None

    def _finish(self, refused: Refused) -> Refused:
        self._done = True
        self._buf = b""
        return refused


def _check_request_line(line: str) -> Refused | str:
    """Refuse a bad request line; return the request target of a good one."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        return refuse(400, _BAD_LINE)
    method, target, major, minor = match.groups()
    if major != "1":
        return refuse(505, f"HTTP/{major}.{minor} not supported, expected HTTP/1.1")
    if minor != "1":
        return refuse(400, f"HTTP/{major}.{minor} request, expected HTTP/1.1")
    if method != "GET":
        return refuse(405, f"method {method} not allowed, expected GET")
    return target


def _decide(buf: bytes | bytearray, end: int) -> Accepted | Refused:
    """Check a complete request head, ``buf[:end]``; build the outcome."""
    head = buf[: end + 2]  # each line keeps its CRLF
    text = head.decode("latin-1")
    eol = text.find("\r\n")
    target = _check_request_line(text[:eol])
    if isinstance(target, Refused):
        return target
    # Deleting the allowed bytes leaves the line ends and any forbidden byte:
    # what is left must read CR LF CR LF ... (that each CR is right before its
    # LF is then checked by _FIELD, whose matches end with CR LF).
    crlfs = head.translate(None, _TEXT)
    if crlfs != _CRLFS[: len(crlfs)]:
        return refuse(400, _BAD_BYTES)
    lines = (len(crlfs) >> 1) - 1
    if lines > MAX_FIELDS:
        return refuse(431, f"more than {MAX_FIELDS} header fields")
    block = text[eol + 2 :]
    fields = _FIELD.findall(block)
    if len(fields) != lines:
        if head.count(b"\r\n") << 1 != len(crlfs):  # a bare CR, then a bare LF
            return refuse(400, _BAD_BYTES)
        # A line that is not ``token ":" value``: obs-fold, a space before the
        # colon, no colon, an empty name.
        return refuse(400, "invalid header line")
    found = {name.lower(): value for name, value in fields}
    if len(found) < len(fields):
        found = _combine(fields)

    value = found.get("upgrade")
    if value is None or not _has_token(value, "websocket"):
        return refuse(426, "expected Upgrade: websocket")
    value = found.get("connection")
    if value is None or not _has_token(value, "upgrade"):
        return refuse(426, "expected Connection: Upgrade")
    key = _single(found, "sec-websocket-key")
    if key is None:
        return refuse(400, "expected one Sec-WebSocket-Key header")
    if _KEY.fullmatch(key) is None:
        return refuse(400, "Sec-WebSocket-Key is not base64 of 16 bytes")
    version = _single(found, "sec-websocket-version")
    if version is None:
        return refuse(400, "expected one Sec-WebSocket-Version header")
    if version != "13":
        return refuse(426, "unsupported Sec-WebSocket-Version, expected 13")
    host = _single(found, "host")
    if host is None:
        return refuse(400, "expected one Host header")
    if _HOST.fullmatch(host) is None:
        return refuse(400, "invalid Host header")
    if "transfer-encoding" in found:
        return refuse(400, "a handshake request has no body (Transfer-Encoding)")
    value = found.get("content-length")
    if value is not None and any(item.strip(" \t") != "0" for item in value.split(",")):
        return refuse(400, "a handshake request has no body (Content-Length)")

    accept = b2a_base64(sha1(key.encode("ascii") + GUID).digest(), newline=False)
    leftover = bytes(buf[end + 4 :])
    COUNTS.handshakes += 1
    return Accepted(target, fields, _RESPONSE_HEAD + accept + b"\r\n\r\n", leftover)


def _combine(fields: list[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased names to values, for a request that repeats a field name.

    Repeated list fields are joined with commas; a repeated singleton among the
    checked fields maps to ``_REPEATED``. Other fields are not needed.
    """
    found: dict[str, str] = {}
    for name, value in fields:
        lower = name.lower()
        if lower not in _CHECKED:
            continue
        old = found.get(lower)
        if old is None:
            found[lower] = value
        elif lower in _LISTS:
            found[lower] = f"{old},{value}"
        else:
            found[lower] = _REPEATED
    return found


def _single(found: dict[str, str], name: str) -> str | None:
    """The field's value if the request sent it exactly once, else None."""
    value = found.get(name)
    return None if value == _REPEATED else value


def _has_token(value: str, token: str) -> bool:
    """Whether a comma-separated list ``value`` holds ``token``, ignoring case."""
    value = value.lower()
    if value == token:
        return True
    return any(item.strip(" \t") == token for item in value.split(","))
