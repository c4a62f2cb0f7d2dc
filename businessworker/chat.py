"""The chat of workerman-chat, message for message (see the packet capture seed).

Client -> server:
    {"type":"login","name":N}              optional "room":R scopes everything below
    {"type":"say","to_uid":"all"|UID,"content":C}
Server -> client (uid = the client id):
    {"type":"user_list","user_list":[{"uid":U,"name":N},...]}   to the new client, first
    {"type":"login","uid":U,"name":N,"time":T}                  to the room, new client included
    {"type":"say","from_uid":U,"to_uid":"all"|UID,"content":C,"time":T}
    {"type":"logout","uid":U,"name":N,"time":T}
    {"type":"error","code":CODE,"message":TEXT}                 to the offender alone

Continuity (an extension; a client that does not ask sees none of it):
    {"type":"login",...,"resume":true}                     positions from now on
    {"type":"login",...,"resume":{"epoch":E,"offset":K}}   and first what came after
                                                           (E, K), the last seen
Such a client's user_list also has "recovered" (false: some of what it missed
is gone and none of it follows: start afresh), "missed" (how many room
messages follow it as the replay) and "epoch"/"offset" (the room's position
now); every room message it gets has "epoch" and "offset" too.

Uses only the public API, like any application. Each room is the group
"room:" + name; the default room has the empty name. Rooms keep their last
HISTORY messages for HISTORY_SECONDS (``api.keep_history``), in one order for
every member.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from businessworker import api

MAX_NAME = 32
MAX_CONTENT = 4096
HISTORY = 200
HISTORY_SECONDS = 300.0

api.keep_history("room:*", count=HISTORY, seconds=HISTORY_SECONDS)


class ChatError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def room_group(room: str) -> str:
    return "room:" + room


async def on_message(client_id: int, message: str | bytes, session: dict[str, Any]) -> None:
    try:
        request = parse(message)
        kind = request.get("type")
        if kind == "login":
            await login(client_id, request, session)
        elif kind == "say":
            await say(client_id, request, session)
        elif isinstance(kind, str):
            raise ChatError("unknown_type", f"unknown message type {kind!r}")
        else:
            raise ChatError("bad_field", 'field "type" must be a string')
    except ChatError as exc:
        api.send_to_client(client_id, {"type": "error", "code": exc.code, "message": exc.message})


def on_close(client_id: int, session: dict[str, Any]) -> None:
    name = session.get("name")
    if name is None:
        return
    api.send_to_group(
        room_group(session.get("room", "")),
        {"type": "logout", "uid": client_id, "name": name, "time": now()},
    )


def parse(message: str | bytes) -> dict[str, Any]:
    if isinstance(message, bytes):
        raise ChatError("bad_json", "send JSON in text frames")
    try:
        request = json.loads(message)
    except ValueError:
        raise ChatError("bad_json", "not valid JSON") from None
    if not isinstance(request, dict):
        raise ChatError("not_object", "a message must be a JSON object")
    return request


async def login(client_id: int, request: dict[str, Any], session: dict[str, Any]) -> None:
    if "name" in session:
        raise ChatError("already_logged_in", "already logged in")
    name = request.get("name")
    if not isinstance(name, str):
        raise ChatError("bad_field", 'field "name" must be a string')
    if not name.strip() or len(name) > MAX_NAME:
        raise ChatError("bad_name", f"a name has 1 to {MAX_NAME} characters")
    room = request.get("room", "")
    if not isinstance(room, str) or len(room) > MAX_NAME:
        raise ChatError(
            "bad_field", f'field "room" must be a string of at most {MAX_NAME} characters'
        )
    since = _since(request.get("resume"))
    session["name"] = name
    session["room"] = room
    session["since"] = time.time()
    group = room_group(room)
    try:
        # Join first, holding the room's traffic back until the user_list below
        # is written: whoever logs in concurrently is then either in our list or
        # announced to us after it, whichever worker handles them.
        joined = await api.join_group(client_id, group, hold=True, since=since)
        members = await api.get_client_sessions_by_group(group)
    except (TimeoutError, ConnectionError):
        # Not half logged in: undo, and let the client try again.
        for key in ("name", "room", "since"):
            session.pop(key, None)
        api.leave_group(client_id, group)
        raise ChatError("busy", "the server is busy, log in again") from None
    # Oldest login first, as in the capture (uids of different gateways do not
    # sort by age).
    logged_in = sorted(
        (s.get("since", 0.0), uid, s["name"]) for uid, s in members.items() if "name" in s
    )
    users = ",".join([user_entry(uid, name) for _, uid, name in logged_in])
    extra = ""
    if since is not None and isinstance(joined, dict):
        extra = (
            ","
            + json.dumps(
                {k: joined[k] for k in ("recovered", "missed", "epoch", "offset")},
                separators=(",", ":"),
            )[1:-1]
        )
    api.send_to_client(client_id, '{"type":"user_list","user_list":[' + users + "]" + extra + "}")
    api.send_to_group(group, {"type": "login", "uid": client_id, "name": name, "time": now()})


async def say(client_id: int, request: dict[str, Any], session: dict[str, Any]) -> None:
    name = session.get("name")
    if name is None:
        raise ChatError("not_logged_in", "log in first")
    content = request.get("content")
    if not isinstance(content, str):
        raise ChatError("bad_field", 'field "content" must be a string')
    if len(content) > MAX_CONTENT:
        raise ChatError("content_too_long", f"content has at most {MAX_CONTENT} characters")
    to_uid = request.get("to_uid")
    room = session.get("room", "")
    if to_uid == "all":
        api.send_to_group(
            room_group(room),
            {
                "type": "say",
                "from_uid": client_id,
                "to_uid": "all",
                "content": content,
                "time": now(),
            },
        )
        return
    target = _uid(to_uid)
    peer = await api.get_session(target)
    if peer is None or "name" not in peer or peer.get("room", "") != room:
        raise ChatError("unknown_uid", f"no logged-in user with uid {to_uid}")
    message = {
        "type": "say",
        "from_uid": client_id,
        "to_uid": target,
        "content": content,
        "time": now(),
    }
    api.send_to_clients([target] if target == client_id else [target, client_id], message)


def _since(resume: Any) -> tuple[Any, ...] | None:
    """The login's "resume": None (not asked), () (from now), or (epoch, offset)."""
    if resume is None or resume is False:
        return None
    if resume is True:
        return ()
    if (
        isinstance(resume, dict)
        and isinstance(resume.get("epoch"), str)
        and isinstance(resume.get("offset"), int)
        and not isinstance(resume.get("offset"), bool)
        and len(resume["epoch"]) <= 64
    ):
        return (resume["epoch"], resume["offset"])
    raise ChatError("bad_field", 'field "resume" must be true or {"epoch":E,"offset":K}')


@functools.lru_cache(maxsize=100_000)
def user_entry(uid: int, name: str) -> str:
    """One user_list entry as JSON. Cached: a login storm lists each member once per login."""
    return json.dumps({"uid": uid, "name": name}, separators=(",", ":"))


def _uid(value: Any) -> int:
    if isinstance(value, bool):
        raise ChatError("bad_field", 'field "to_uid" must be "all" or a uid')
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdecimal() and len(value) < 17:
        return int(value)
    raise ChatError("bad_field", 'field "to_uid" must be "all" or a uid')
