"""A test app that exposes the whole worker API to a WebSocket client.

The client sends {"op": NAME, "args": [...], "kwargs": {...}, "id": N}; the app
calls ``api.NAME(*args, **kwargs)`` (awaiting queries) and answers
{"reply": N, "result": ...}. A few extra ops exercise the callbacks themselves.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from typing import Any

from businessworker import api, cluster

# join_group's answer is awaited (it says whether the client was online): a query here.
COMMANDS = set(cluster.COMMANDS) - {"join_group"}
QUERIES = set(cluster.QUERIES) | {"join_group"}


def on_connect(client_id: int, session: dict[str, Any]) -> None:
    session["connected_pid"] = os.getpid()


def on_websocket_connect(client_id: int, request: Any, session: dict[str, Any]) -> bool:
    if request.path == "/refuse":
        return False
    api.send_to_client(
        client_id,
        {
            "hello": client_id,
            "path": request.path,
            "query": request.params,
            "agent": request.header("x-probe"),
            "peer": request.peer,
        },
    )
    return True


async def on_message(client_id: int, message: str | bytes, session: dict[str, Any]) -> None:
    if isinstance(message, bytes):
        api.send_to_client(client_id, message)  # echo binary frames back
        return
    request = json.loads(message)
    op, args, kwargs = request["op"], request.get("args", []), request.get("kwargs", {})
    if op == "raise":
        raise RuntimeError("probe: callback failure on purpose")
    if op == "echo":
        # Yield to the loop a random number of times: ordering must still hold.
        for _ in range(request.get("yields", 0)):
            await asyncio.sleep(0)
        api.send_to_client(client_id, {"echo": args[0], "pid": os.getpid()})
        return
    if op == "session":
        session.update(kwargs)
        result: Any = dict(session)
    elif op == "whoami":
        result = {"client_id": client_id, "pid": os.getpid(), "session": dict(session)}
    elif op in COMMANDS:
        result = getattr(api, op)(*args, **kwargs)
    elif op in QUERIES:
        result = getattr(api, op)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    else:
        raise ValueError(f"unknown op {op}")
    if isinstance(result, dict):
        result = {str(k): v for k, v in result.items()}
    api.send_to_client(client_id, {"reply": request.get("id"), "result": result})


def on_close(client_id: int, session: dict[str, Any]) -> None:
    watcher = session.get("watcher")
    if watcher:
        api.send_to_client(watcher, {"closed": client_id, "session": session})
