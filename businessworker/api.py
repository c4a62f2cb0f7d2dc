"""The API business code uses to address clients anywhere in the cluster.

    from businessworker import api

    def on_message(client_id, message, session):
        api.send_to_all(message)

Commands (``send_*``, ``close_client``, groups, uids, sessions) are
fire-and-forget and reach each gateway in the order they were called.
Queries (``is_online``, ``get_*``) are coroutines answered by the gateways
concerned; await them. ``join_group`` returns an awaitable acknowledgement.

``data`` may be ``str`` (sent as a text frame), ``bytes`` (a binary frame) or
any other JSON-serialisable value (encoded once, as compact JSON, here in the
worker; never once per recipient).

Client ids are ints. Groups and uids are strings (ints are accepted and turned
into strings). Unknown or offline client ids are ignored by commands and
answered as offline / ``None`` by queries.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from businessworker import presence
from businessworker.links import concat
from gateway import link as gw
from gateway import protocol as p
from gateway.link import Run

if TYPE_CHECKING:
    from businessworker.links import GatewayLinks

__all__ = [
    "bind_uid",
    "close_client",
    "get_all_client_count",
    "get_all_client_sessions",
    "get_all_group_ids",
    "get_client_count_by_group",
    "get_client_ids_by_group",
    "get_client_ids_by_uid",
    "get_client_sessions_by_group",
    "get_session",
    "get_uid_by_client_id",
    "get_uids_by_group",
    "is_online",
    "is_uid_online",
    "join_group",
    "keep_history",
    "keep_member",
    "leave_group",
    "resume",
    "send_to_all",
    "send_to_client",
    "send_to_clients",
    "send_to_group",
    "send_to_uid",
    "set_session",
    "unbind_uid",
    "ungroup",
    "update_session",
]

MEMBER_KEY = presence.MEMBER_KEY
"""The session key that ``keep_member`` reserves for a kept member's record."""

_links: GatewayLinks | None = None
_scope: ContextVar[Any] = ContextVar("businessworker_callback_scope", default=None)
"""The callback being run (set by the dispatcher); its session is written back
before any query, so a callback that changed its session then asks the cluster
sees its own change."""


def bind(links: GatewayLinks | None) -> None:
    """Point the API at a worker's links (done by the worker at start)."""
    global _links
    _links = links


_bound: ContextVar[GatewayLinks | None] = ContextVar("businessworker_links", default=None)
"""Links of a cluster client (``businessworker.cluster``) that the call runs on, if any."""


def linked() -> GatewayLinks | None:
    """The links calls made here go through (this worker's, or a cluster client's),
    or None outside a running worker."""
    bound = _bound.get()  # not ``or``: links with no gateway linked now are falsy (len 0)
    return bound if bound is not None else _links


def _cluster() -> GatewayLinks:
    links = linked()
    if links is None:
        raise RuntimeError(
            "the businessworker API is only usable inside a running worker "
            "(elsewhere, use businessworker.Cluster or AsyncCluster)"
        )
    return links


def encode(data: Any) -> str | bytes:
    """str and bytes pass through; anything else becomes compact JSON (ASCII, like PHP)."""
    if isinstance(data, str | bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    return json.dumps(data, separators=(",", ":"))


def _ids(client_ids: Iterable[int] | None) -> list[int]:
    return [int(c) for c in client_ids] if client_ids else []


def _key(value: str | int) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"group names and uids are str or int, not {type(value).__name__}")
    return str(value)


def _flush_session() -> None:
    scope = _scope.get()
    if scope is not None:
        scope.flush()


def _run() -> Run:
    """The run the commands being sent belong to: the callback's, or this turn's own."""
    scope = _scope.get()
    return scope.run if scope is not None else _cluster().own_run()


# Sending


def send_to_client(client_id: int, data: Any) -> None:
    """Send to one client, wherever it is connected."""
    _cluster().send_to_client(client_id, gw.encode_send([int(client_id)], encode(data)), _run())


def send_to_clients(client_ids: Iterable[int], data: Any) -> None:
    """Send the same data to several clients (one command per gateway concerned)."""
    by_link = _cluster().group_by_link(_ids(client_ids))
    if by_link:
        payload = encode(data)
        for link, ids in by_link.items():
            link.send_frame(gw.encode_send(ids, payload), _run())


def send_to_all(data: Any, *, exclude: Iterable[int] | None = None) -> None:
    """Send to every client of the cluster, except ``exclude``."""
    _cluster().broadcast(gw.encode_send_all(encode(data), _ids(exclude)), _run())


def send_to_group(
    group: str | Iterable[str], data: Any, *, exclude: Iterable[int] | None = None
) -> None:
    """Send to every member of a group (or of several, each client once).

    A group that keeps history (``keep_history``) gets the message through the
    stream register: in one order for every member, kept for members who come
    back. Sent to several groups at once, a member of a history group and of
    another gets it once from each.
    """
    groups = [_key(group)] if isinstance(group, str | int) else [_key(g) for g in group]
    payload = encode(data)
    excluded = _ids(exclude)
    plain = []
    for name in groups:
        bounds = history_of(name)
        if bounds is None:
            plain.append(name)
        else:
            _publish(name, payload, excluded, bounds)
    if plain:
        _cluster().broadcast(gw.encode_send_group(plain, payload, excluded), _run())


_history: dict[str, tuple[int, float]] = {}
"""group name, or prefix ending in ``*`` -> (count, seconds)"""


def keep_history(group: str, *, count: int = 200, seconds: float = 300.0) -> None:
    """Make a group (or every group whose name starts so, with a trailing ``*``) keep
    its last ``count`` messages for ``seconds``, in one order for all its members.

    Call it at import time or in ``on_worker_start``, the same on every worker.
    Members who join with ``since`` then get positions, and what they missed.
    """
    if count < 1 or seconds <= 0:
        raise ValueError("keep_history needs count >= 1 and seconds > 0")
    _history[_key(group)] = (int(count), float(seconds))


def history_of(group: str) -> tuple[int, float] | None:
    """The (count, seconds) a group keeps, or None if it keeps no history."""
    if not _history:
        return None
    bounds = _history.get(group)
    if bounds is not None:
        return bounds
    for pattern, found in _history.items():
        if pattern.endswith("*") and group.startswith(pattern[:-1]):
            return found
    return None


def _publish(group: str, payload: Any, exclude: list[int], bounds: tuple[int, float]) -> None:
    """Hand a history group's message to one gateway: the event's own, else any."""
    run = _run()
    link = _cluster().publisher_for(run)
    if link is not None:
        link.send_frame(gw.encode_publish_group(group, payload, exclude, *bounds), run)


def send_to_uid(uid: str | int | Iterable[str | int], data: Any) -> None:
    """Send to every connection bound to a uid (or to several uids)."""
    uids = [_key(uid)] if isinstance(uid, str | int) else [_key(u) for u in uid]
    _cluster().broadcast(gw.encode_send_uid(uids, encode(data)), _run())


def close_client(client_id: int, data: Any = None, *, code: int = 1000) -> None:
    """Close a client, after an optional last message."""
    payload = None if data is None else encode(data)
    _cluster().send_to_client(client_id, gw.encode_close(int(client_id), payload, code), _run())


# Groups and uids


def join_group(
    client_id: int,
    group: str | int,
    *,
    hold: bool = False,
    since: tuple[str, int] | list[Any] | None = None,
) -> Awaitable[Any]:
    """Add a client to a group; await the result to know the join is done (False: offline).

    With ``hold=True`` the client's gateway holds back group and broadcast
    messages for it until the next message sent to it directly (for instance a
    snapshot of the group's members), so that the snapshot always comes first.

    For a history group, ``since`` opts the client in to positions: every
    message of the group then reaches it with ``"epoch"`` and ``"offset"``
    added (JSON objects). ``since=()`` starts from now; ``since=(epoch,
    offset)``, what the client last saw, first replays everything after it, in
    order, before any new message. The result is then a dict: ``recovered``
    (False: some of it was gone, nothing was replayed, rebuild), ``missed``,
    and the group's ``epoch`` and ``offset`` now.
    """
    _flush_session()
    link = _cluster().for_client(client_id)
    if link is None:
        return _done(False)
    name = _key(group)
    _note_member(client_id, join=name)
    position = None
    if since is not None and history_of(name) is not None:
        position = list(since)
        if len(position) not in (0, 2):
            raise ValueError("since is () or (epoch, offset)")
    future = link.join(int(client_id), name, hold, _run(), position)
    if position is None:
        return future
    return _as_recovery(future)


async def _as_recovery(joined: Awaitable[Any]) -> Any:
    result = await joined
    if result is True:  # a repeat of a join already done: what was replayed is unknown
        return {"recovered": False, "missed": 0, "epoch": "", "offset": 0}
    return result


def leave_group(client_id: int, group: str | int) -> None:
    """Take a client out of a group (nothing if it is not in it)."""
    _note_member(client_id, leave=_key(group))
    _cluster().send_to_client(client_id, gw.encode_leave(int(client_id), _key(group)), _run())


def ungroup(group: str | int) -> None:
    """Dissolve a group on every gateway (its members stay connected)."""
    _cluster().broadcast(gw.encode_ungroup(_key(group)), _run())


def bind_uid(client_id: int, uid: str | int) -> None:
    """Bind a client to a user id (one uid per client; a uid may have many clients)."""
    _note_member(client_id, uid=_key(uid))
    _cluster().send_to_client(client_id, gw.encode_bind_uid(int(client_id), _key(uid)), _run())


def unbind_uid(client_id: int, uid: str | int) -> None:
    """Unbind a client from its uid (nothing if it is bound to another)."""
    _note_member(client_id, uid=None)
    frame = gw.encode_unbind_uid(int(client_id), _key(uid))
    _cluster().send_to_client(client_id, frame, _run())


# Members kept through a disconnect (businessworker.presence)


def keep_member(client_id: int, *, grace: float = presence.DEFAULT_GRACE) -> str:
    """Keep this client as a member for ``grace`` seconds after its connection goes;
    returns the token that a new connection gives ``resume`` to carry on as it.

    Call it from the client's own callback, before joining its groups and binding
    its uid: those are what a resume gives back. The grace starts when the
    connection drops or our side closes it (a drain, a gateway that died); a
    client that closes it itself (a close frame: a Leave button, a closed tab)
    has left, and its on_close runs at once. A member that does not come back
    within the grace gets its on_close then, once; while away it stays in its
    groups' rosters and is sent nothing (history groups keep what it missed).
    Each call makes a new token; the last one is the one that works.
    """
    scope = _own_scope(client_id, "keep_member")
    link = _cluster().for_client(client_id)
    if link is None:
        return ""
    secret = presence.new_secret()
    grace = float(grace)
    if not 0 < grace <= 3600:
        raise ValueError("keep_member needs 0 < grace <= 3600 seconds")
    old = scope.session.get(presence.MEMBER_KEY) or {}
    scope.session[presence.MEMBER_KEY] = {
        "secret": secret,
        "grace": grace,
        "groups": list(old.get("groups") or ()),
        "uid": old.get("uid"),
    }
    link.send_frame(gw.encode_keep(int(client_id), secret, grace), _run())
    return presence.token_of(link.gateway_id, int(client_id), secret)


async def resume(client_id: int, token: str, *, rejoin: bool = True) -> dict[str, Any] | None:
    """Carry on, as this new client, the kept member that ``token`` names.

    Call it from the new client's own callback. The member is taken out of
    wherever it waits (on any gateway; one whose gateway died is looked for
    until the workers have parked it, about a second) and nobody sees it
    leave: its session replaces this client's (the callback's ``session``
    dict is updated in place), its uid is bound here, and with ``rejoin`` its
    groups are joined again (plain joins: join a history group yourself, with
    ``since``, to replay what it missed). This client is then kept in turn.

    Returns ``{"client_id": the member's old id, "session", "groups", "uid",
    "token": the new token}``, or None if there is no such member any more
    (its grace ended, it resumed elsewhere, or the token is wrong): then treat
    this client as new. Never raises for a bad token.
    """
    scope = _own_scope(client_id, "resume")
    parsed = presence.parse_token(token)
    if parsed is None:
        return None
    gateway_id, old_id, secret = parsed
    cluster = _cluster()
    started = time.monotonic()
    while True:
        _flush_session()
        links = cluster.all()
        answers = await asyncio.gather(
            *(link.query(p.Q_RESUME, old_id, secret, int(client_id)) for link in links),
            return_exceptions=True,
        )
        found = next((a for a in answers if a and not isinstance(a, BaseException)), None)
        if found is not None:
            break
        asked_it = any(
            link.gateway_id == gateway_id and not isinstance(a, BaseException)
            for link, a in zip(links, answers, strict=True)
        )
        # The workers park a dead gateway's members as they learn it is gone, or,
        # while no gateway was linked, as soon as one is.
        since = max(cluster.gone.get(gateway_id) or started, cluster.linked_at)
        if asked_it or time.monotonic() - since > presence.PARK_WAIT:
            return None  # its gateway answered, or had time to be parked: not kept
        await asyncio.sleep(presence.RESUME_RETRY)
    _version, packed, groups, uid = found
    old = p.unpack_session(packed)
    member = old.get(presence.MEMBER_KEY) or {}
    session = scope.session
    session.clear()
    session.update(old)
    session[presence.MEMBER_KEY] = {
        "secret": "",
        "grace": member.get("grace", presence.DEFAULT_GRACE),
        "groups": [],
        "uid": None,
    }
    if uid is not None:
        bind_uid(client_id, uid)
    if rejoin:
        for group in groups:
            join_group(client_id, group)
    new_token = keep_member(client_id, grace=float(member.get("grace", presence.DEFAULT_GRACE)))
    return {
        "client_id": old_id,
        "session": session,
        "groups": list(groups),
        "uid": uid,
        "token": new_token,
    }


def _own_scope(client_id: int, what: str) -> Any:
    scope = _scope.get()
    if scope is None or scope.client_id != int(client_id):
        raise RuntimeError(f"{what} is called from the client's own callback")
    return scope


def _note_member(
    client_id: int, *, join: str | None = None, leave: str | None = None, **uid: Any
) -> None:
    """Keep a kept member's record of its groups and uid (changed in its own callback)."""
    scope = _scope.get()
    if scope is None or scope.client_id != client_id:
        return
    member = scope.session.get(presence.MEMBER_KEY)
    if member is None:
        return
    groups = member.setdefault("groups", [])
    if join is not None and join not in groups:
        groups.append(join)
    if leave is not None and leave in groups:
        groups.remove(leave)
    if uid:
        member["uid"] = uid["uid"]


# Sessions


def set_session(client_id: int, session: dict[str, Any]) -> None:
    """Replace a client's session (from any worker, by client id)."""
    frame = gw.encode_set_session(int(client_id), p.pack_session(session))
    _cluster().send_to_client(client_id, frame, _run())


def update_session(client_id: int, changes: dict[str, Any]) -> None:
    """Merge keys into a client's session."""
    frame = gw.encode_update_session(int(client_id), p.pack_session(changes))
    _cluster().send_to_client(client_id, frame, _run())


# Queries


async def is_online(client_id: int) -> bool:
    """Whether the client is connected (a kept member away within its grace counts)."""
    return bool(await _ask_client(client_id, p.Q_IS_ONLINE, False))


async def get_session(client_id: int) -> dict[str, Any] | None:
    """The client's session (a copy), or None if it is not connected."""
    packed = await _ask_client(client_id, p.Q_SESSION, None)
    return None if packed is None else _cluster().session(packed)


async def get_uid_by_client_id(client_id: int) -> str | None:
    """The uid the client is bound to, or None."""
    return await _ask_client(client_id, p.Q_UID, None)


async def is_uid_online(uid: str | int) -> bool:
    """Whether any connection is bound to the uid."""
    return bool(await get_client_ids_by_uid(uid))


async def get_client_ids_by_uid(uid: str | int) -> list[int]:
    """The client ids bound to the uid, on every gateway, sorted."""
    return sorted(concat(await _ask_all(p.Q_UID_CLIENTS, _key(uid))))


async def get_client_sessions_by_group(group: str | int) -> dict[int, dict[str, Any]]:
    """{client id: session} of every member of the group, in client id order."""
    return _cluster().sessions(await _ask_all(p.Q_GROUP_SESSIONS, _key(group)))


async def get_client_ids_by_group(group: str | int) -> list[int]:
    """The client ids of the group's members, on every gateway, sorted."""
    return sorted(concat(await _ask_all(p.Q_GROUP_CLIENTS, _key(group))))


async def get_uids_by_group(group: str | int) -> list[str]:
    """The uids bound to the group's members, each once, sorted."""
    return sorted(set(concat(await _ask_all(p.Q_GROUP_UIDS, _key(group)))))


async def get_client_count_by_group(group: str | int) -> int:
    """How many clients are in the group, on every gateway."""
    return sum(n or 0 for n in await _ask_all(p.Q_GROUP_COUNT, _key(group)))


async def get_all_group_ids() -> list[str]:
    """Every group with at least one member, sorted."""
    return sorted(set(concat(await _ask_all(p.Q_GROUPS))))


async def get_all_client_count() -> int:
    """How many clients the cluster holds."""
    return sum(n or 0 for n in await _ask_all(p.Q_COUNT))


async def get_all_client_sessions() -> dict[int, dict[str, Any]]:
    """{client id: session} of every client of the cluster."""
    return _cluster().sessions(await _ask_all(p.Q_ALL_SESSIONS))


async def _ask_client(client_id: int, kind: str, offline: Any) -> Any:
    _flush_session()
    return await _cluster().ask(client_id, kind, offline)


async def _ask_all(kind: str, *args: Any) -> list[Any]:
    _flush_session()
    return await _cluster().ask_all(kind, *args)


def _done(value: Any) -> asyncio.Future[Any]:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
