"""Chat clients that live inside a network namespace, driven over stdin/stdout.

    ip netns exec NS python -m tests.deploy.driver

Each request is one JSON line {"op": ..., ...}; each answer one JSON line
{"ok": true, "result": ...} or {"ok": false, "error": "..."}. Requests are handled one
at a time, and every client keeps what it receives in order (tests/chat.py), so a test
can say on one host and then expect on another. Operations:

    open     name url                 connect a client
    login    name nick room           -> {"uid": ..., "users": [user_list entries]}
    say      name content [to]        to "all" (default) or a uid
    expect   name type [timeout]      -> the next message, which must be of that type
    fenced   name marker [timeout]    the next message is the say ``marker``: nothing
                                      came before it (the marker is said after what
                                      must not arrive, by the same sender)
    state    name                     -> "OPEN", "CLOSED", ...
    close    name
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from businessworker.testing import TIMEOUT
from tests.chat import ChatClient


async def handle(clients: dict[str, ChatClient], request: dict[str, Any]) -> Any:
    op, name = request["op"], request.get("name", "")
    if op == "open":
        clients[name] = await ChatClient.open(request["url"])
        return None
    client = clients[name]
    if op == "login":
        users = await client.login(request["nick"], room=request.get("room"))
        return {"uid": client.uid, "users": users}
    if op == "say":
        await client.say(request["content"], to=request.get("to", "all"))
        return None
    if op == "expect":
        return await client.expect(request["type"], timeout=request.get("timeout", TIMEOUT))
    if op == "fenced":
        await client.fenced(request["marker"], timeout=request.get("timeout", TIMEOUT))
        return None
    if op == "state":
        return client.ws.state.name
    if op == "close":
        await client.close()
        return None
    raise ValueError(f"unknown op {op!r}")


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    clients: dict[str, ChatClient] = {}
    while line := await reader.readline():
        try:
            answer = {"ok": True, "result": await handle(clients, json.loads(line))}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for client in clients.values():
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
