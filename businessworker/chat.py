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
    {"type":"login",...,"resume":{"token":T,"epoch":E,"offset":K}}
                                                           and carry on as the member
                                                           of token T (epoch/offset
                                                           optional)
Such a client's user_list also has "recovered" (false: some of what it missed
is gone and none of it follows: start afresh), "missed" (how many room
messages follow it as the replay), "epoch"/"offset" (the room's position
now), "uid" (its own), "token" (to resume with next time) and "resumed"
(true: it carries on as the member of the token it gave, same uid and name,
and nobody was told it left or joined; false: it is a new member). Every room
message it gets has "epoch" and "offset" too. Such a member stays in the room
for GRACE seconds (CHAT_GRACE, default 10) after its connection drops (or the
server closed it); its logout comes only if it is not back by then. One that
closes its connection itself has left: its logout comes at once. When a member
resumes, every such client in the room gets
    {"type":"back","uid":U,"name":N,"time":T}
(the member itself excepted), which shows nothing but puts U in the list if it
is not there: a client that resumed a moment earlier may have had a user_list
without U (after a gateway died, its workers park its members on the new
gateway one by one, so a roster read meanwhile can miss some of them).

Uses only the public API, like any application. Each room is the group
"room:" + name; the default room has the empty name. Rooms keep their last
HISTORY messages (CHAT_HISTORY, 200; 0 for none) for HISTORY_SECONDS
(``api.keep_history``), in one order for every member.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

from businessworker import api, metrics

MAX_NAME = 32
MAX_CONTENT = 4096
HISTORY = int(os.environ.get("CHAT_HISTORY", "200"))
"""messages a room keeps for members who come back (CHAT_HISTORY; 0: rooms keep none)"""
HISTORY_SECONDS = 300.0
GRACE = float(os.environ.get("CHAT_GRACE", "10"))

if HISTORY > 0:
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


def presence_group(room: str) -> str:
    """The room's clients that asked for continuity: they alone get "back"."""
    return "back:" + room


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
        metrics.app_event(f"error_{exc.code}")  # worker_app_events_total{event="error_bad_json"}
        api.send_to_client(client_id, {"type": "error", "code": exc.code, "message": exc.message})


def on_close(client_id: int, session: dict[str, Any]) -> None:
    name = session.get("name")
    if name is None:
        return
    api.send_to_group(
        room_group(session.get("room", "")),
        {"type": "logout", "uid": session.get("uid", client_id), "name": name, "time": now()},
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
    since, token = _resume(request.get("resume"))
    back = None if token is None else await api.resume(client_id, token, rejoin=False)
    resumed = back is not None
    if back is not None:  # the same member: its name, room and uid are back in session
        room = session.get("room", "")
    else:
        session["name"] = name
        session["room"] = room
        session["since"] = time.time()
        session["uid"] = client_id
    member_token = None
    if back is not None:
        member_token = back["token"]
    elif since is not None:
        member_token = api.keep_member(client_id, grace=GRACE)
        api.bind_uid(client_id, client_id)
    group = room_group(room)
    if since is not None:  # before the room's join: any "back" not in our list then reaches us
        api.join_group(client_id, presence_group(room))
    try:
        # Join first, holding the room's traffic back until the user_list below
        # is written: whoever logs in concurrently is then either in our list or
        # announced to us after it, whichever worker handles them.
        joined = await api.join_group(client_id, group, hold=True, since=since)
        members = await api.get_client_sessions_by_group(group)
    except (TimeoutError, ConnectionError):
        # Not half logged in: undo, and let the client try again. (A resumed
        # member stays logged in: its token is spent, and its uid must not vanish.)
        if not resumed:
            for key in ("name", "room", "since", "uid", api.MEMBER_KEY):
                session.pop(key, None)
        api.leave_group(client_id, group)
        api.leave_group(client_id, presence_group(room))
        raise ChatError("busy", "the server is busy, log in again") from None
    # Oldest login first, as in the capture (uids of different gateways do not
    # sort by age).
    logged_in = sorted(
        (s.get("since", 0.0), s.get("uid", uid), s["name"])
        for uid, s in members.items()
        if "name" in s
    )
    users = ",".join([user_entry(uid, name) for _, uid, name in logged_in])
    extra: dict[str, Any] = {}
    if since is not None:
        if isinstance(joined, dict):
            extra = {k: joined[k] for k in ("recovered", "missed", "epoch", "offset")}
        else:  # rooms keep no history (CHAT_HISTORY=0): nothing can be recovered
            extra = {"recovered": False, "missed": 0, "epoch": "", "offset": 0}
        extra.update(uid=session["uid"], token=member_token, resumed=resumed)
    tail = "," + json.dumps(extra, separators=(",", ":"))[1:-1] if extra else ""
    api.send_to_client(client_id, '{"type":"user_list","user_list":[' + users + "]" + tail + "}")
    if not resumed:
        api.send_to_group(group, {"type": "login", "uid": client_id, "name": name, "time": now()})
    else:
        notice = {"type": "back", "uid": session["uid"], "name": session["name"], "time": now()}
        api.send_to_group(presence_group(room), notice, exclude=[client_id])


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
    me = session.get("uid", client_id)
    if to_uid == "all":
        api.send_to_group(
            room_group(room),
            {
                "type": "say",
                "from_uid": me,
                "to_uid": "all",
                "content": content,
                "time": now(),
            },
        )
        return
    target = _uid(to_uid)
    peer_id, peer = await _find(target)
    if peer is None or "name" not in peer or peer.get("room", "") != room:
        raise ChatError("unknown_uid", f"no logged-in user with uid {to_uid}")
    message = {
        "type": "say",
        "from_uid": me,
        "to_uid": target,
        "content": content,
        "time": now(),
    }
    api.send_to_clients([peer_id] if peer_id == client_id else [peer_id, client_id], message)


async def _find(uid: int) -> tuple[int, dict[str, Any] | None]:
    """The client id and session of the user ``uid``: its own client id, or, for a
    member that resumed on another connection, the client bound to it."""
    peer = await api.get_session(uid)
    if peer is not None and peer.get("uid", uid) == uid:
        return uid, peer
    for client_id in await api.get_client_ids_by_uid(uid):
        peer = await api.get_session(client_id)
        if peer is not None and peer.get("uid") == uid:
            return client_id, peer
    return uid, None


def _resume(resume: Any) -> tuple[tuple[Any, ...] | None, str | None]:
    """The login's "resume": (since, token). since is None (not asked), () (from
    now) or (epoch, offset); token is the member to carry on as, or None."""
    if resume is None or resume is False:
        return None, None
    if resume is True:
        return (), None
    if isinstance(resume, dict):
        token = resume.get("token")
        epoch, offset = resume.get("epoch"), resume.get("offset")
        if token is not None and (not isinstance(token, str) or len(token) > 128):
            raise ChatError("bad_field", 'field "resume.token" must be a string')
        if epoch is None and offset is None:
            if token is not None:
                return (), token
        elif (
            isinstance(epoch, str)
            and isinstance(offset, int)
            and not isinstance(offset, bool)
            and len(epoch) <= 64
        ):
            return (epoch, offset), token
    raise ChatError("bad_field", 'field "resume" must be true or {"token":T,"epoch":E,"offset":K}')


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
