"""The hand-written opening handshake (gateway.handshake), checked against websockets."""

from __future__ import annotations

import base64
import os

import pytest
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from websockets.utils import accept_key as ws_accept_key

from gateway.handshake import MAX_FIELDS, MAX_HEAD, Accepted, HandshakeParser, Refused, accept_key

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
BASE = [
    ("Host", "server.example.com"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", RFC_KEY),
    ("Sec-WebSocket-Version", "13"),
]


def request(
    fields: list[tuple[str, str]] = BASE,
    line: str = "GET /chat HTTP/1.1",
    *,
    drop: str = "",
) -> bytes:
    """A request head from a request line and fields, without field ``drop``."""
    lines = [line] + [f"{n}: {v}" for n, v in fields if not drop or n.lower() != drop.lower()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def with_field(name: str, value: str) -> list[tuple[str, str]]:
    """BASE with field ``name`` replaced by (or, if absent, extended with) ``value``."""
    out = [(n, value if n == name else v) for n, v in BASE]
    return out if any(n == name for n, _ in BASE) else [*out, (name, value)]


def feed_whole(data: bytes) -> Accepted | Refused | None:
    return HandshakeParser().feed(data)


def feed_bytewise(data: bytes) -> Accepted | Refused | None:
    parser = HandshakeParser()
    for i in range(len(data)):
        outcome = parser.feed(data[i : i + 1])
        if outcome is not None:
            # Whatever follows the decisive byte is the caller's: hand it back.
            if isinstance(outcome, Accepted):
                outcome.leftover += data[i + 1 :]
            return outcome
    return None


def masked_text(text: str) -> bytes:
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=True)


# The accept key and the 101 response


def test_accept_key_matches_rfc_6455_example() -> None:
    assert accept_key(RFC_KEY) == RFC_ACCEPT
    assert accept_key(RFC_KEY.encode()) == RFC_ACCEPT
    for _ in range(20):
        key = base64.b64encode(os.urandom(16)).decode()
        assert accept_key(key) == ws_accept_key(key)


def test_rfc_6455_example_request_gets_exact_101() -> None:
    data = request(
        [
            ("Host", "server.example.com"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Origin", "http://example.com"),
            ("Sec-WebSocket-Protocol", "chat, superchat"),
            ("Sec-WebSocket-Version", "13"),
        ]
    )
    outcome = feed_whole(data)
    assert isinstance(outcome, Accepted)
    assert outcome.response == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + RFC_ACCEPT.encode() + b"\r\n\r\n"
    )  # no subprotocol: the offered one is simply not accepted
    assert outcome.path == "/chat"
    assert outcome.headers[5] == ("Sec-WebSocket-Protocol", "chat, superchat")
    assert outcome.leftover == b""


# Incremental feeding and leftover bytes


def test_byte_by_byte_equals_whole_and_leftover_comes_back() -> None:
    frames = masked_text("hello") + masked_text("second")
    data = request(with_field("Cookie", "a=1; b=2")) + frames
    whole = feed_whole(data)
    assert isinstance(whole, Accepted)
    assert whole.leftover == frames
    parser = HandshakeParser()
    head_len = len(data) - len(frames)
    for i in range(head_len - 1):
        assert parser.feed(data[i : i + 1]) is None
    # The last byte of the head arrives together with the frames.
    bytewise = parser.feed(data[head_len - 1 :])
    assert bytewise == whole
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_every_two_way_split_gives_the_same_outcome() -> None:
    data = request(with_field("User-Agent", "Mozilla/5.0 (X11)")) + masked_text("x")
    whole = feed_whole(data)
    for cut in range(1, len(data)):
        parser = HandshakeParser()
        first = parser.feed(data[:cut])
        outcome = first if first is not None else parser.feed(data[cut:])
        if first is not None:  # the head was complete in the first part
            outcome.leftover += data[cut:]
        assert outcome == whole, cut
    assert feed_bytewise(data) == whole


def test_split_terminator_is_found() -> None:
    data = request()
    for cut in range(len(data) - 4, len(data)):
        parser = HandshakeParser()
        assert parser.feed(data[:cut]) is None
        assert isinstance(parser.feed(data[cut:]), Accepted)


# Interoperability with websockets' client and request parser

VARIANTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "reversed": ("/", list(reversed(BASE))),
    "lower-case names": ("/", [(n.lower(), v) for n, v in BASE]),
    "upper-case names": ("/", [(n.upper(), v) for n, v in BASE]),
    "token case and lists": (
        "/ws",
        [
            ("Host", "localhost:8080"),
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "WebSocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", RFC_KEY),
        ],
    ),
    "list in Upgrade, repeated Connection": (
        "/",
        [
            ("Host", "[::1]:8000"),
            ("Upgrade", "h2c, websocket"),
            ("Connection", "keep-alive"),
            ("Connection", "upgrade"),
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Sec-WebSocket-Version", "13"),
        ],
    ),
    "browser-like with extras and query": (
        "/chat?room=lobby&name=%E7%8C%AA&flag",
        [
            ("Host", "chat.example.com"),
            ("Connection", "Upgrade"),
            ("Pragma", "no-cache"),
            ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0"),
            ("Upgrade", "websocket"),
            ("Origin", "https://chat.example.com"),
            ("Sec-WebSocket-Version", "13"),
            ("Accept-Language", "fr-FR,fr;q=0.9"),
            ("Cookie", "session=abc; theme=caf\xe9"),  # obs-text, kept as latin-1
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
            ("Sec-WebSocket-Protocol", "chat"),
            ("Content-Length", "0"),
        ],
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_websockets_client_accepts_our_response(variant: str) -> None:
    path, fields = VARIANTS[variant]
    client = ClientProtocol(
        parse_uri("ws://chat.example.com" + path),
        extensions=[ClientPerMessageDeflateFactory()],
        subprotocols=["chat"],
    )
    sent = client.connect()
    # Same request line and fields as the variant, but the client's own key.
    own = [(n, sent.headers["Sec-WebSocket-Key"] if v == RFC_KEY else v) for n, v in fields]
    client.send_request(Request(path, Headers(own)))
    data = b"".join(client.data_to_send())

    outcome = HandshakeParser().feed(data)
    assert isinstance(outcome, Accepted), outcome
    assert outcome.path == path
    assert outcome.headers == own
    assert outcome.leftover == b""

    client.receive_data(outcome.response)
    (response,) = client.events_received()
    assert isinstance(response, Response)
    assert response.status_code == 101
    assert client.handshake_exc is None
    assert client.state is State.OPEN
    assert client.extensions == []
    assert client.subprotocol is None

    # websockets' own request parser reads the same path and fields.
    server = ServerProtocol()
    server.receive_data(data)
    (parsed,) = server.events_received()
    assert parsed.path == outcome.path
    assert list(parsed.headers.raw_items()) == outcome.headers


def test_optional_whitespace_around_values_is_stripped() -> None:
    data = (
        b"GET / HTTP/1.1\r\n"
        b"Host:example.com\r\n"
        b"Upgrade: \t websocket \t\r\n"
        b"Connection:Upgrade   \r\n"
        b"Sec-WebSocket-Key:  " + RFC_KEY.encode() + b"  \r\n"
        b"Sec-WebSocket-Version: 13\t\r\n"
        b"X-Empty:\r\n"
        b"X-Inner:  a  b \r\n\r\n"
    )
    outcome = feed_whole(data)
    assert isinstance(outcome, Accepted)
    assert outcome.headers == [
        ("Host", "example.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", RFC_KEY),
        ("Sec-WebSocket-Version", "13"),
        ("X-Empty", ""),
        ("X-Inner", "a  b"),
    ]
    server = ServerProtocol()
    server.receive_data(data)
    (parsed,) = server.events_received()
    assert list(parsed.headers.raw_items()) == outcome.headers
    assert RFC_ACCEPT.encode() in outcome.response


# Refusals

REFUSALS: dict[str, tuple[bytes, int]] = {
    "POST": (request(line="POST /chat HTTP/1.1"), 405),
    "lower-case method": (request(line="get /chat HTTP/1.1"), 405),
    "HTTP/1.0": (request(line="GET /chat HTTP/1.0"), 400),
    "HTTP/2.0": (request(line="GET /chat HTTP/2.0"), 505),
    "no version": (request(line="GET /chat"), 400),
    "two spaces": (request(line="GET  /chat HTTP/1.1"), 400),
    "space in target": (request(line="GET /a b HTTP/1.1"), 400),
    "non-ASCII target": (request(line="GET /caf\xe9 HTTP/1.1"), 400),
    "empty line first": (b"\r\n" + request(), 400),
    "nothing": (b"\r\n\r\n", 400),
    "binary garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "no Upgrade": (request(drop="Upgrade"), 426),
    "Upgrade: h2c": (request(with_field("Upgrade", "h2c")), 426),
    "Upgrade: websockets": (request(with_field("Upgrade", "websockets")), 426),
    "no Connection": (request(drop="Connection"), 426),
    "Connection: keep-alive": (request(with_field("Connection", "keep-alive")), 426),
    "no key": (request(drop="Sec-WebSocket-Key"), 400),
    "two keys": (request([*BASE, ("sec-websocket-key", RFC_KEY)]), 400),
    "key of 15 bytes": (
        request(with_field("Sec-WebSocket-Key", base64.b64encode(b"x" * 15).decode())),
        400,
    ),
    "key of 17 bytes": (
        request(with_field("Sec-WebSocket-Key", base64.b64encode(b"x" * 17).decode())),
        400,
    ),
    "key not base64": (request(with_field("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ!=")), 400),
    "key unpadded": (request(with_field("Sec-WebSocket-Key", RFC_KEY.rstrip("="))), 400),
    "version 8": (request(with_field("Sec-WebSocket-Version", "8")), 426),
    "version list": (request(with_field("Sec-WebSocket-Version", "13, 8")), 426),
    "no version header": (request(drop="Sec-WebSocket-Version"), 400),
    "two versions": (request([*BASE, ("Sec-WebSocket-Version", "13")]), 400),
    "no Host": (request(drop="Host"), 400),
    "two Hosts": (request([*BASE, ("host", "other.example.com")]), 400),
    "empty Host": (request(with_field("Host", "")), 400),
    "bad Host": (request(with_field("Host", "a b")), 400),
    "Transfer-Encoding": (request(with_field("Transfer-Encoding", "chunked")), 400),
    "Content-Length": (request(with_field("Content-Length", "5")), 400),
    "obs-fold": (request(with_field("X-Long", "a\r\n  b")), 400),
    "space before colon": (request([*BASE, ("X-Bad ", "1")]), 400),
    "no colon": (request(BASE).replace(b"Upgrade: websocket", b"Upgrade websocket"), 400),
    "empty name": (request([*BASE, ("", "x")]), 400),
    "non-token name": (request([*BASE, ("X(y)", "x")]), 400),
    "NUL in value": (request(with_field("X-Bad", "a\x00b")), 400),
    "DEL in value": (request(with_field("X-Bad", "a\x7fb")), 400),
    "bare CR in value": (request(with_field("X-Bad", "a\rb")), 400),
    "bare LF line end": (request(BASE).replace(b"Upgrade\r\n", b"Upgrade\n"), 400),
    "LF-only request": (request(BASE).replace(b"\r\n", b"\n"), 400),
    "too many fields": (
        request([*BASE, *[(f"X-{i}", "1") for i in range(MAX_FIELDS - len(BASE) + 1)]]),
        431,
    ),
    "head over 16 KiB": (request(with_field("Cookie", "c" * MAX_HEAD)), 431),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case: str) -> None:
    data, status = REFUSALS[case]
    whole, bytewise = feed_whole(data), feed_bytewise(data)
    assert isinstance(bytewise, Refused) and isinstance(whole, Refused)
    assert (bytewise.status, bytewise.reason) == (whole.status, whole.reason)
    for outcome in (whole, bytewise):
        assert isinstance(outcome, Refused), outcome
        assert outcome.status == status
        assert outcome.reason
        head, _, body = outcome.response.partition(b"\r\n\r\n")
        head += b"\r\n"
        assert head.startswith(f"HTTP/1.1 {status} ".encode())
        assert body.startswith(b"Failed to open a WebSocket connection: ")
        assert f"\r\nContent-Length: {len(body)}\r\n".encode() in head
        assert b"\r\nConnection: close\r\n" in head or b"\r\nConnection: Upgrade, close\r\n" in head
        if status == 426:
            assert b"\r\nSec-WebSocket-Version: 13\r\n" in head
            assert b"\r\nUpgrade: websocket\r\n" in head
        if status == 405:
            assert b"\r\nAllow: GET\r\n" in head


def test_refusal_is_a_valid_http_response_for_websockets_client() -> None:
    outcome = feed_whole(request(with_field("Sec-WebSocket-Version", "8")))
    assert isinstance(outcome, Refused)
    client = ClientProtocol(parse_uri("ws://server.example.com/chat"))
    client.send_request(client.connect())
    client.receive_data(outcome.response)
    client.receive_eof()
    (response,) = client.events_received()
    assert response.status_code == 426
    assert response.headers["Sec-WebSocket-Version"] == "13"
    assert response.body.decode().startswith("Failed to open a WebSocket connection: ")


def test_limits_accept_at_the_boundary() -> None:
    fields = [*BASE, *[(f"X-{i}", "1") for i in range(MAX_FIELDS - len(BASE))]]
    assert isinstance(feed_whole(request(fields)), Accepted)  # exactly MAX_FIELDS

    base = len(request(with_field("Cookie", "")))
    exact = request(with_field("Cookie", "c" * (MAX_HEAD - base)))
    assert len(exact) == MAX_HEAD
    assert isinstance(feed_whole(exact), Accepted)
    assert isinstance(feed_whole(exact + masked_text("x")), Accepted)
    parser = HandshakeParser()
    assert parser.feed(exact[:-1]) is None
    assert isinstance(parser.feed(exact[-1:]), Accepted)
    over = request(with_field("Cookie", "c" * (MAX_HEAD - base + 1)))
    assert feed_whole(over).status == 431
    parser = HandshakeParser()
    assert parser.feed(over[:MAX_HEAD]).status == 431  # decided before the last byte


def test_oversized_header_stream_is_refused_once_over_the_limit() -> None:
    parser = HandshakeParser()
    assert parser.feed(b"GET / HTTP/1.1\r\n") is None
    fed = 16
    chunk = b"X-Pad: " + b"a" * 4089 + b"\r\n"  # 4 KiB of header lines at a time
    outcome = None
    while fed < 1024 * 1024:
        outcome = parser.feed(chunk)
        fed += len(chunk)
        if outcome is not None:
            break
        assert fed < MAX_HEAD
    assert isinstance(outcome, Refused)
    assert outcome.status == 431
    assert MAX_HEAD <= fed < MAX_HEAD + len(chunk)
    with pytest.raises(RuntimeError):
        parser.feed(chunk)


def test_garbage_is_refused_at_once() -> None:
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64)
    outcome = HandshakeParser().feed(client_hello)
    assert isinstance(outcome, Refused)
    assert outcome.status == 400
    parser = HandshakeParser()
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    assert parser.feed(b"Upgrade: websocket\n").status == 400  # bare LF


def test_bad_request_line_is_refused_before_the_headers_arrive() -> None:
    parser = HandshakeParser()
    assert parser.feed(b"POST /chat HT") is None
    outcome = parser.feed(b"TP/1.1\r\nHost: x")
    assert isinstance(outcome, Refused)
    assert outcome.status == 405
    parser = HandshakeParser()
    assert parser.feed(b"GET /chat HTTP/1.1\r\nHost: x\r\n") is None  # good so far


# Handing over to websockets' frame layer


def test_leftover_frames_parse_in_an_open_server_protocol() -> None:
    frames = masked_text("first message") + masked_text("second")
    outcome = feed_bytewise(request() + frames)
    assert isinstance(outcome, Accepted)
    ws = ServerProtocol(state=State.OPEN, max_size=1024)
    ws.receive_data(outcome.leftover)
    events = ws.events_received()
    assert [(e.opcode, e.data) for e in events] == [
        (Opcode.TEXT, b"first message"),
        (Opcode.TEXT, b"second"),
    ]

    # The closing handshake, client first: the server echoes the close frame.
    ws.receive_data(Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=True))
    (close,) = ws.events_received()
    assert close.opcode is Opcode.CLOSE
    assert ws.state is State.CLOSING
    echoed = ws.data_to_send()
    assert echoed[0] == Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=False)
    assert echoed[-1] == b""  # end of stream: the server closes TCP
    ws.receive_eof()
    assert ws.state is State.CLOSED


def test_open_server_protocol_enforces_max_size_and_masking() -> None:
    ws = ServerProtocol(state=State.OPEN, max_size=16)
    ws.receive_data(masked_text("x" * 17))
    assert ws.events_received() == []
    assert ws.close_sent is not None and ws.close_sent.code == 1009  # message too big

    ws = ServerProtocol(state=State.OPEN, max_size=16)
    ws.receive_data(Frame(Opcode.TEXT, b"unmasked").serialize(mask=False))
    assert ws.events_received() == []
    assert ws.close_sent is not None and ws.close_sent.code == 1002  # protocol error


def test_open_server_protocol_answers_pings_and_closes_first() -> None:
    ws = ServerProtocol(state=State.OPEN, max_size=1024)
    ws.receive_data(Frame(Opcode.PING, b"p").serialize(mask=True))
    assert [e.opcode for e in ws.events_received()] == [Opcode.PING]
    assert ws.data_to_send() == [Frame(Opcode.PONG, b"p").serialize(mask=False)]

    # The gateway closes first: close frame out, the client's answer in, then EOF.
    ws.send_close(1001, "going away")
    close = Frame(Opcode.CLOSE, Close(1001, "going away").serialize())
    assert ws.data_to_send() == [close.serialize(mask=False)]
    assert ws.state is State.CLOSING
    ws.receive_data(close.serialize(mask=True))
    assert ws.data_to_send() == [b""]  # end of stream: the server closes TCP
    ws.receive_eof()
    assert ws.state is State.CLOSED
