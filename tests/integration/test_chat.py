"""The chat of the seed page, over real processes and real WebSocket clients.

The seed's capture replayed byte for byte, and what the WebSocket layer does with
bad frames, floods and handshakes. The chat's rules (private says, rooms,
logouts, every bad input, concurrent logins, presence) are tested in-process on
businessworker.testing: tests/unit/test_chat_rules.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from string import Template

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
    await nick.say("marker")  # behind anything else the room would have sent
    assert (await nick.expect("say"))["content"] == "marker"
    await nick.close()


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
