"""A real WebSocket chat client for tests: speaks the seed protocol, reads strictly in order."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from businessworker.testing import TIMEOUT  # one unit for every wait: CHAT_TEST_TIMEOUT


class ChatClient:
    """One browser-like client: every frame it receives is kept, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.uid: int | None = None
        self.received: list[dict[str, Any]] = []
        self.frames: list[str] = []
        """every text frame received, exactly as it came over the wire"""
        self._later: deque[dict[str, Any]] = deque()
        self.user_list: dict[str, Any] = {}
        """the last login's user_list message, whole"""
        """frames read ahead by ``login`` and not yet handed out"""

    @classmethod
    async def open(cls, url: str) -> ChatClient:
        ws = await connect(
            url, compression=None, open_timeout=TIMEOUT, max_size=2**22, max_queue=None
        )
        return cls(ws)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(message if isinstance(message, str | bytes) else json.dumps(message))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self._later:
            return self._later.popleft()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
        # races with a frame, and the cancelled reader then reads on.
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        self.frames.append(raw)
        message = json.loads(raw)
        self.received.append(message)
        return message

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        message = await self.recv(timeout)
        assert message["type"] == kind, f"expected {kind}, got {message}"
        return message

    async def login(
        self, name: str, room: str | None = None, *, keep_own: bool = False, **extra: Any
    ) -> list[dict[str, Any]]:
        """Log in; return the user_list once our own login was announced.

        Room traffic that was held back during the login (others' logins and
        says) comes right after the user_list, possibly before our own login;
        those frames are kept for later ``recv`` calls, in order. A member that
        resumed (``"resumed": true`` in the user_list) is announced to nobody:
        then the user_list is all there is.
        """
        request: dict[str, Any] = {"type": "login", "name": name}
        if room is not None:
            request["room"] = room
        request.update(extra)
        await self.send(request)
        self.user_list = await self.expect("user_list")
        users = self.user_list["user_list"]
        if self.user_list.get("resumed"):
            self.uid = self.user_list["uid"]
            return users
        mine = {u["uid"] for u in users if u["name"] == name}
        ahead: list[dict[str, Any]] = []
        while True:
            message = await self.recv()
            if message["type"] == "login" and message["name"] == name and message["uid"] in mine:
                break
            ahead.append(message)
        if keep_own:  # handed out by recv too, in its place
            ahead.append(message)
        self._later.extend(ahead)
        self.uid = message["uid"]
        return users

    async def say(self, content: str, to: int | str = "all") -> None:
        await self.send({"type": "say", "to_uid": to, "content": content})

    async def fenced(self, marker: str, timeout: float = TIMEOUT) -> None:
        """The next message is the say ``marker``: nothing came before it. Sent after
        what should not arrive, by the same sender, it shows that nothing else came."""
        message = await self.recv(timeout)
        assert message["type"] == "say" and message["content"] == marker, (
            f"unexpected {message} before the marker {marker!r}"
        )

    async def closed(self, timeout: float = TIMEOUT) -> tuple[int | None, str | None]:
        """Wait until the server closes us; return (code, reason)."""
        try:
            while True:
                async with asyncio.timeout(timeout):
                    await self.ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code, rcvd.reason) if rcvd else (None, None)

    async def close(self) -> None:
        await self.ws.close()
