"""The chat of the seed page, over real processes and real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import re
import time
from string import Template

import pytest
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from tests.chat import ChatClient
from tests.cluster import Cluster


def assert_frame(raw: str, template: str, **values: int | str) -> None:
    """Compare a frame to the seed's JSON to the byte, with uids filled in and the time read.

    ``template`` is the literal frame with $-placeholders; $time must be a
    "YYYY-MM-DD HH:MM:SS" stamp within seconds of now.
    """
    found = re.search(r'"time":"([^"]*)"', raw)
    stamp = found.group(1) if found else ""
    if "$time" in template:
        sent = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
        assert abs(sent - time.time()) < 10, stamp
    assert raw == Template(template).substitute(time=stamp, pig_name=PIG, **values)


PIG = r"\u732a\u732a"
"""猪猪 as the capture shows it: JSON-escaped."""


def uid_in(raw: str) -> int:
    return int(re.search(r'"uid":(\d+)', raw).group(1))


async def test_seed_scenario(chat_cluster: Cluster) -> None:
    """Replay the packet capture: 猪猪 is online, mynick logs in and says "hi, all !"."""
    pig = await ChatClient.open(chat_cluster.ws_url(1))
    nick = await ChatClient.open(chat_cluster.ws_url(0))
    await pig.send('{"type":"login","name":"猪猪"}')
    await pig.recv()
    await pig.recv()
    pig_uid = uid_in(pig.frames[1])
    assert_frame(
        pig.frames[0],
        '{"type":"user_list","user_list":[{"uid":$pig,"name":"$pig_name"}]}',
        pig=pig_uid,
    )
    assert_frame(
        pig.frames[1],
        '{"type":"login","uid":$pig,"name":"$pig_name","time":"$time"}',
        pig=pig_uid,
    )

    await nick.send('{"type":"login","name":"mynick"}')
    await nick.recv()
    await nick.recv()
    nick_uid = uid_in(nick.frames[1])
    assert nick_uid != pig_uid and nick_uid < 2**53
    ids = {"pig": pig_uid, "nick": nick_uid}
    assert_frame(
        nick.frames[0],
        '{"type":"user_list","user_list":[{"uid":$pig,"name":"$pig_name"},{"uid":$nick,"name":"mynick"}]}',
        **ids,
    )
    login = '{"type":"login","uid":$nick,"name":"mynick","time":"$time"}'
    assert_frame(nick.frames[1], login, **ids)
    await pig.recv()
    assert_frame(pig.frames[2], login, **ids)

    await nick.send('{"type":"say","to_uid":"all","content":"hi, all !"}')
    say = '{"type":"say","from_uid":$nick,"to_uid":"all","content":"hi, all !","time":"$time"}'
    await nick.recv()
    await pig.recv()
    assert_frame(nick.frames[2], say, **ids)
    assert_frame(pig.frames[3], say, **ids)

    await pig.close()
    await nick.recv()
    logout = '{"type":"logout","uid":$pig,"name":"$pig_name","time":"$time"}'
    assert_frame(nick.frames[3], logout, **ids)
    await nick.quiet()
    await nick.close()


async def test_private_say_reaches_only_recipient_and_sender(chat_cluster: Cluster) -> None:
    a, b, c = [await ChatClient.open(chat_cluster.ws_url(i % 2)) for i in range(3)]
    await a.login("a", room="private")
    await b.login("b", room="private")
    await a.expect("login")
    await c.login("c", room="private")
    await a.expect("login")
    await b.expect("login")
    await a.say("psst", to=b.uid)
    for client in (b, a):
        got = await client.expect("say")
        assert list(got) == ["type", "from_uid", "to_uid", "content", "time"]
        assert (got["from_uid"], got["to_uid"], got["content"]) == (a.uid, b.uid, "psst")
    # The uid may also come as a string, as pages built from <select> values send it.
    await b.say("back", to=str(a.uid))
    assert (await a.expect("say"))["content"] == "back"
    assert (await b.expect("say"))["to_uid"] == a.uid
    await c.quiet()
    for client in (a, b, c):
        await client.close()


async def test_logout_goes_to_everyone_left(chat_cluster: Cluster) -> None:
    a, b, c = [await ChatClient.open(chat_cluster.ws_url(i % 2)) for i in range(3)]
    await a.login("a", room="logout")
    await b.login("b", room="logout")
    await a.expect("login")
    await c.login("c", room="logout")
    await a.expect("login")
    await b.expect("login")
    await b.close()
    for client in (a, c):
        got = await client.expect("logout")
        assert list(got) == ["type", "uid", "name", "time"]
        assert (got["uid"], got["name"]) == (b.uid, "b")
    await a.close()
    assert (await c.expect("logout"))["uid"] == a.uid
    await c.close()


async def test_rooms_scope_user_list_says_and_logouts(chat_cluster: Cluster) -> None:
    red = await ChatClient.open(chat_cluster.ws_url(0))
    blue = await ChatClient.open(chat_cluster.ws_url(1))
    await red.login("r", room="red")
    assert [u["name"] for u in await blue.login("b", room="blue")] == ["b"]
    await red.say("only red")
    assert (await red.expect("say"))["content"] == "only red"
    await red.send({"type": "say", "to_uid": blue.uid, "content": "cross-room"})
    assert (await red.expect("error"))["code"] == "unknown_uid"
    await red.close()
    await blue.quiet()
    await blue.close()


async def test_a_client_on_another_gateway_receives_broadcasts(chat_cluster: Cluster) -> None:
    """Clients spread over both gateways; every say reaches every one of them."""
    clients = [await ChatClient.open(chat_cluster.ws_url(i % 2)) for i in range(6)]
    for i, client in enumerate(clients):
        await client.login(f"u{i}", room="spread")
        for earlier in clients[:i]:
            await earlier.expect("login")
    for i, client in enumerate(clients):
        await client.say(f"from {i}")
        for other in clients:
            got = await other.expect("say")
            assert (got["from_uid"], got["content"]) == (client.uid, f"from {i}")
    for client in clients:
        await client.close()


BAD_INPUTS = [
    ("not json", "bad_json"),
    ('"just a string"', "not_object"),
    ("[1, 2]", "not_object"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": 7}', "bad_field"),
    ('{"no_type": true}', "bad_field"),
    ('{"type": "say", "to_uid": "all", "content": "x"}', "not_logged_in"),
    ('{"type": "login"}', "bad_field"),
    ('{"type": "login", "name": 5}', "bad_field"),
    ('{"type": "login", "name": ""}', "bad_name"),
    ('{"type": "login", "name": "   "}', "bad_name"),
    ('{"type": "login", "name": "%s"}' % ("n" * 33), "bad_name"),
    ('{"type": "login", "name": "ok", "room": 3}', "bad_field"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_INPUTS)
async def test_bad_input_gets_an_error_and_the_connection_stays(
    chat_cluster: Cluster, frame: str, code: str
) -> None:
    client = await ChatClient.open(chat_cluster.ws_url(0))
    await client.send(frame)
    error = await client.expect("error")
    assert list(error) == ["type", "code", "message"]
    assert error["code"] == code and error["message"]
    # Still open and usable:
    await client.login("survivor", room=f"bad-{code}")
    await client.close()


async def test_bad_input_after_login(chat_cluster: Cluster) -> None:
    client = await ChatClient.open(chat_cluster.ws_url(1))
    await client.login("me", room="after-login")
    cases = [
        ({"type": "login", "name": "again"}, "already_logged_in"),
        ({"type": "say", "to_uid": "all", "content": "x" * 4097}, "content_too_long"),
        ({"type": "say", "to_uid": "all", "content": 5}, "bad_field"),
        ({"type": "say", "to_uid": "all"}, "bad_field"),
        ({"type": "say", "content": "x"}, "bad_field"),
        ({"type": "say", "to_uid": True, "content": "x"}, "bad_field"),
        ({"type": "say", "to_uid": 12345, "content": "x"}, "unknown_uid"),
    ]
    for request, code in cases:
        await client.send(request)
        assert (await client.expect("error"))["code"] == code, request
    await client.send(b'{"type":"say"}')  # a binary frame is not a chat message
    assert (await client.expect("error"))["code"] == "bad_json"
    await client.say("y" * 4096)  # the limit itself is fine
    assert len((await client.expect("say"))["content"]) == 4096
    await client.close()


async def test_oversized_frame_closes_1009(chat_cluster: Cluster) -> None:
    client = await ChatClient.open(chat_cluster.ws_url(0))
    await client.send("x" * (64 * 1024 + 1))
    assert (await client.closed())[0] == 1009


async def test_oversized_fragmented_message_closes_1009(chat_cluster: Cluster) -> None:
    client = await ChatClient.open(chat_cluster.ws_url(0))
    await client.ws.send(["a" * 40_000, "b" * 40_000])  # two fragments, 80 KB in all
    assert (await client.closed())[0] == 1009


async def test_invalid_utf8_closes_1007(chat_cluster: Cluster) -> None:
    client = await ChatClient.open(chat_cluster.ws_url(1))
    await client.ws.send(b'{"type":"login","name":"\xff\xfe"}', text=True)
    assert (await client.closed())[0] == 1007


async def test_a_flood_is_slowed_not_dropped(chat_cluster: Cluster) -> None:
    """2,000 says sent as fast as possible: all come back, in order."""
    client = await ChatClient.open(chat_cluster.ws_url(0))
    await client.login("flood", room="flood")
    count = 2000

    async def send() -> None:
        for i in range(count):
            await client.say(str(i))

    sender = asyncio.create_task(send())
    got = [(await client.expect("say"))["content"] for _ in range(count)]
    await sender
    assert got == [str(i) for i in range(count)]
    await client.close()


async def test_concurrent_logins_converge(chat_cluster: Cluster) -> None:
    """50 clients over 2 gateways and 4 workers log in at once; every roster ends true."""
    n = 50
    clients = [await ChatClient.open(chat_cluster.ws_url(i % 2)) for i in range(n)]
    rosters: list[dict[int, str]] = [{} for _ in range(n)]

    async def log_in(i: int) -> None:
        client = clients[i]
        await client.send({"type": "login", "name": f"c{i}", "room": "storm"})
        first = await client.expect("user_list")
        rosters[i] = {u["uid"]: u["name"] for u in first["user_list"]}

    await asyncio.gather(*(log_in(i) for i in range(n)))

    async def settle(i: int) -> None:
        # After its user_list, a client hears one login per user its list lacked
        # (and possibly repeats); stop once the roster is complete.
        client = clients[i]
        while len(rosters[i]) < n:
            message = await client.expect("login")
            rosters[i][message["uid"]] = message["name"]

    await asyncio.wait_for(asyncio.gather(*(settle(i) for i in range(n))), 20)
    truth = rosters[0]
    assert sorted(truth.values()) == sorted(f"c{i}" for i in range(n))
    for roster in rosters:
        assert roster == truth
    for client in clients:
        await client.close()


async def test_handshake_without_compression_and_plain_json_frames(chat_cluster: Cluster) -> None:
    """No permessage-deflate even when offered: frames stay readable in a capture."""
    async with connect(chat_cluster.ws_url(0)) as ws:  # offers permessage-deflate
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        await ws.send(json.dumps({"type": "nope"}))
        assert json.loads(await ws.recv())["code"] == "unknown_type"


async def test_a_bad_handshake_gets_an_http_error_and_is_closed(chat_cluster: Cluster) -> None:
    old_version = (
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", chat_cluster.ws_ports[0])
    writer.write(old_version)
    response = await asyncio.wait_for(reader.read(), 10)  # read() returns at EOF: closed
    writer.close()
    assert response.startswith(b"HTTP/1.1 426 ")
    assert b"Sec-WebSocket-Version: 13\r\n" in response
    reader, writer = await asyncio.open_connection("127.0.0.1", chat_cluster.ws_ports[0])
    writer.write(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"x" * 20_000 + b"\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert response.startswith(b"HTTP/1.1 431 ")


async def test_a_frame_sent_with_the_handshake_is_not_lost(chat_cluster: Cluster) -> None:
    """A client may send its first frame without waiting for the 101 response."""
    request = (
        b"GET /?x=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    frame = Frame(Opcode.TEXT, b'{"type":"nope"}').serialize(mask=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", chat_cluster.ws_ports[0])
    writer.write(request + frame)  # one write: both usually arrive in one segment
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    first = await asyncio.wait_for(reader.readexactly(2), 10)
    assert first[0] == 0x81  # an unmasked text frame, short enough for a 1-byte length
    payload = await asyncio.wait_for(reader.readexactly(first[1]), 10)
    assert json.loads(payload)["code"] == "unknown_type"
    writer.close()
