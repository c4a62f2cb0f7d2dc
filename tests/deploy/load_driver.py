"""A room under chat load (tests/deploy/chatter.py) inside a network namespace, driven
over stdin/stdout like tests/deploy/driver.py:

    ip netns exec NS python -m tests.deploy.load_driver

    open     urls size senders    members spread over urls; senders among those of urls[0]
    start                         the senders begin saying numbered lines
    end                           -> the round's counts (chatter.Round as a dict)
    rosters                       a newcomer's user_list is exactly the connected members
    twice                         -> uids some member heard logged out more than once
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

from tests.deploy.chatter import Room


async def handle(state: dict[str, Room], request: dict[str, Any]) -> Any:
    op = request["op"]
    if op == "open":
        room = state["room"] = Room(request["urls"], request["size"], request["senders"])
        await room.open()
        room.choose_senders([m for m in room.members if m.url == request["urls"][0]])
        return None
    room = state["room"]
    if op == "start":
        room.start()
        return None
    if op == "end":
        result = dataclasses.asdict(await room.end())
        result["errors"] = room.errors()[:5]
        return result
    if op == "rosters":
        await room.assert_rosters_true()
        return None
    if op == "twice":
        return room.logged_out_twice()
    raise ValueError(f"unknown op {op!r}")


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    state: dict[str, Room] = {}
    while line := await reader.readline():
        try:
            answer = {"ok": True, "result": await handle(state, json.loads(line))}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    if "room" in state:
        await state["room"].close()


if __name__ == "__main__":
    asyncio.run(main())
