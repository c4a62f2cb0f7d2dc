"""The gateway's command handling: what workers ask a gateway to do.

Every send builds its WebSocket frame once and writes the same bytes to every
recipient socket; nothing here is done per recipient that can be done once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chatcluster.logs import Throttle, held_back
from gateway import protocol as p
from gateway.connection import text_frame
from gateway.dedup import KEY_PREFIX, Keyed, Seen
from gateway.metrics import COUNTS

if TYPE_CHECKING:
    from gateway.clients import ClientTable
    from gateway.connection import ClientConnection
    from gateway.presence import Presence
    from gateway.streams import StreamLink
    from gateway.workers import WorkerLink, WorkerPool

log = logging.getLogger("gateway.commands")

_STALE = object()
"""counting mark of a run whose event this session no longer holds: nothing of it acts"""


def _frame(data: str | bytes) -> bytes:
    return text_frame(data, binary=isinstance(data, bytes))


class Commands:
    """Executes worker messages against the client table."""

    def __init__(
        self,
        clients: ClientTable,
        pool: WorkerPool,
        prefixes: Callable[[], list[int]] = list,
        on_declared_gone: Callable[[], None] = lambda: None,
        gateway_id: Callable[[], str] = str,
        streams: StreamLink | None = None,
        presence: Presence | None = None,
    ) -> None:
        self.clients = clients
        self.streams = streams
        self.presence = presence
        self.pool = pool
        self.prefixes = prefixes
        """this gateway's client id prefixes: events whose runs are counted in pool.effects"""
        self.on_declared_gone = on_declared_gone
        self.gateway_id = gateway_id
        self.seen = Seen()
        self.keyed = Keyed()
        self._refusals = Throttle()
        self._handlers: dict[int, Callable[[bytes, list[Any]], None]] = {
            p.HELLO: self._hello,
            p.BYE: self._bye,
            p.ACK: self._ack,
            p.SEND: self._send,
            p.SEND_ALL: self._send_all,
            p.SEND_GROUP: self._send_group,
            p.SEND_UID: self._send_uid,
            p.CLOSE: self._close,
            p.PUBLISH_GROUP: self._publish_group,
            p.JOIN: self._join,
            p.LEAVE: self._leave,
            p.UNGROUP: self._ungroup,
            p.BIND_UID: self._bind_uid,
            p.UNBIND_UID: self._unbind_uid,
            p.SET_SESSION: self._set_session,
            p.UPDATE_SESSION: self._update_session,
            p.KEEP: self._keep,
            p.PARK: self._park,
            p.QUERY: self._query,
        }
        self._queries: dict[str, Callable[..., Any]] = {
            p.Q_IS_ONLINE: lambda cid: cid in self.clients.clients,
            p.Q_SESSION: self._q_session,
            p.Q_UID: self.clients.uid_of,
            p.Q_UID_CLIENTS: lambda uid: list(self.clients.of_uid(uid)),
            p.Q_GROUP_CLIENTS: lambda g: list(self.clients.members(g)),
            p.Q_GROUP_UIDS: self.clients.uids_in,
            p.Q_GROUP_COUNT: lambda g: len(self.clients.members(g)),
            p.Q_GROUPS: lambda: list(self.clients.groups),
            p.Q_COUNT: lambda: len(self.clients),
            p.Q_RESUME: self._q_resume,
        }

    def handle(self, parts: list[bytes]) -> None:
        """One ZeroMQ message: the session's routing id, [MSG, n], then commands.

        Only members act: a peer that has not joined with HELLO (it holds the
        cluster key, or the links are --insecure) has nothing it sends carried
        out, and neither has a fenced session, nor one whose message went missing
        (a gap in n: it is fenced now). Commands are counted per event run
        (``gateway.dedup``): a command an earlier run of its event already
        carried out here is skipped.
        """
        route = parts[0]
        pool = self.pool
        COUNTS.internal_in += 1
        worker = pool.workers.get(route)
        try:
            head = p.unpack(parts[1])
            n = head[1] if head[0] == p.MSG else -1
        except (ValueError, IndexError, TypeError):
            n = -1
        if worker is None:
            if route in pool.fenced or (n > 1 and head[0] == p.MSG):
                COUNTS.fenced_messages += 1
                pool.refuse(route)  # a gone session, or one from before our restart
                return
        elif n != worker.received + 1:
            log.warning(
                "a message of a worker went missing, fencing it worker=%s expected=%d got=%d",
                worker.info.get("id"),
                worker.received + 1,
                n,
            )
            pool.lost(route, "gap")
            COUNTS.fenced_messages += 1
            pool.refuse(route)
            return
        else:
            worker.received = n
            worker.last_seen = time.monotonic()
        handlers = self._handlers
        effects = pool.effects
        counting: Any = None  # the run whose commands follow: None, an int seq, or a key
        index = done = 0
        for frame in parts[2:]:
            try:
                message = p.unpack(frame)
                op = message[0]
                if worker is None:
                    if op != p.HELLO or n != 1:
                        self._not_joined(route, op)
                        continue
                    self._hello(route, message)
                    worker = pool.workers.get(route)
                    continue
                if op == p.CAUSE or op == p.ACK:
                    if counting.__class__ is int:  # the run's count, before it may be acked
                        effects[counting] = done
                    if op == p.CAUSE:
                        counting, index, done = self._cause(worker, message)
                        continue
                    counting = None
                if counting is not None and op in p.EFFECTS:
                    if counting.__class__ is int:
                        skip = index < done
                        if not skip:
                            done = index + 1
                    elif counting.__class__ is str:  # an idempotency key
                        skip = not self.keyed.admit(counting, index)
                    else:
                        skip = counting is _STALE or not self.seen.admit(
                            counting[0], counting[1], index
                        )
                    index += 1
                    if skip:
                        if op == p.JOIN and message[4] is not None:
                            self._reply(route, message[4], True)  # it was joined before
                        continue
                handlers[op](route, message)
            except Exception as exc:  # one bad command must not stop the gateway
                log.warning("bad command from worker=%r error=%r", route, exc)
        if counting.__class__ is int:
            effects[counting] = done
        if len(head) > 2 and head[2] and worker is not None:
            pool.post(route, p.pack([p.RECEIPT, n]))

    def _cause(self, worker: WorkerLink, m: list[Any]) -> tuple[Any, int, int]:
        """What a [CAUSE, source, seq, index] starts: (what to count by, index, done)."""
        if len(m) < 4:
            return None, 0, 0
        source, seq, index = m[1], m[2], m[3]
        if source.__class__ is str and source.startswith(KEY_PREFIX):
            return source, index, 0
        if source.__class__ is int and source in self.prefixes():
            if seq not in worker.unacked:  # not this session's event (any more)
                return _STALE, index, 0
            return seq, index, self.pool.effects.get(seq, 0)
        return (source, seq), index, 0

    def _not_joined(self, worker_id: bytes, opcode: Any) -> None:
        shown = self._refusals.hit(worker_id)
        if shown is not None:
            log.warning(
                "ignored a command from a peer that has not joined as a worker peer=%r opcode=%r%s",
                worker_id,
                opcode,
                held_back(shown),
            )

    def _reply(self, worker_id: bytes, req_id: int, result: Any) -> None:
        self.pool.post(worker_id, p.pack([p.REPLY, req_id, result]))

    # Worker liveness

    def _hello(self, worker_id: bytes, m: list[Any]) -> None:
        info = m[2] if len(m) > 2 else {}
        if info.get("gone"):
            # A worker that ran on_close for our clients, which is how we learn it after
            # the register forgot it too (it restarted while we were paused).
            log.warning("a worker says this gateway was declared gone worker=%s", info.get("id"))
            self.on_declared_gone()
            return
        expected = info.get("gateway")
        if expected and expected != self.gateway_id():
            return  # a link meant for the gateway that had our address before us
        self.pool.hello(worker_id, info)

    def _bye(self, worker_id: bytes, m: list[Any]) -> None:
        COUNTS.byes += 1
        self.pool.bye(worker_id)

    def _ack(self, worker_id: bytes, m: list[Any]) -> None:
        self.pool.ack(worker_id, m[1])

    # Sends

    def _send(self, worker_id: bytes, m: list[Any]) -> None:
        frame = _frame(m[2])
        get = self.clients.clients.get
        sent = 0
        for cid in m[1]:
            conn = get(cid)
            if conn is not None:
                conn.write_direct(frame)
                sent += 1
        COUNTS.delivered(sent, frame)
        COUNTS.unknown_sends += len(m[1]) - sent

    def _send_all(self, worker_id: bytes, m: list[Any]) -> None:
        frame = _frame(m[1])
        exclude = m[2]
        clients = self.clients.clients
        if exclude:
            skip = set(exclude)
            for cid, conn in clients.items():
                if cid not in skip:
                    conn.write(frame)
            COUNTS.delivered(len(clients) - sum(1 for cid in skip if cid in clients), frame)
        else:
            for conn in clients.values():
                conn.write(frame)
            COUNTS.delivered(len(clients), frame)

    def _send_group(self, worker_id: bytes, m: list[Any]) -> None:
        groups, data, exclude = m[1], m[2], m[3]
        members: dict[int, ClientConnection]
        if len(groups) == 1:
            members = self.clients.members(groups[0])
        else:
            members = {}
            for group in groups:
                members.update(self.clients.members(group))
        if not members:
            return
        frame = _frame(data)
        if exclude:
            skip = set(exclude)
            for cid, conn in list(members.items()):
                if cid not in skip:
                    conn.write(frame)
            COUNTS.delivered(len(members) - sum(1 for cid in skip if cid in members), frame)
        else:
            for conn in list(members.values()):
                conn.write(frame)
            COUNTS.delivered(len(members), frame)

    def _send_uid(self, worker_id: bytes, m: list[Any]) -> None:
        targets = [c for uid in m[1] for c in self.clients.of_uid(uid).values()]
        if targets:
            frame = _frame(m[2])
            for conn in targets:
                conn.write_direct(frame)
            COUNTS.delivered(len(targets), frame)

    def _close(self, worker_id: bytes, m: list[Any]) -> None:
        conn = self.clients.get(m[1])
        if conn is None:
            return
        if m[2] is not None:
            frame = _frame(m[2])
            conn.write_direct(frame)
            COUNTS.delivered(1, frame)
        conn.close(m[3] if len(m) > 3 else 1000)

    # Groups, uids, sessions

    def _publish_group(self, worker_id: bytes, m: list[Any]) -> None:
        if self.streams is not None:
            self.streams.publish(m[1], m[2], m[3], m[4], m[5])

    def _join(self, worker_id: bytes, m: list[Any]) -> None:
        conn = self.clients.get(m[1])
        req_id = m[4]
        since = m[5] if len(m) > 5 else None
        if conn is None or since is None or self.streams is None:
            if conn is not None:
                self.clients.join(conn, m[2])
                if m[3]:
                    conn.hold_until_direct()
            if req_id is not None:
                self._reply(worker_id, req_id, conn is not None)
            return
        if m[3]:
            conn.hold_until_direct()

        def reply(result: Any) -> None:
            if req_id is not None:
                self._reply(worker_id, req_id, result)

        self.streams.join(conn, m[2], since, reply)

    def _leave(self, worker_id: bytes, m: list[Any]) -> None:
        conn = self.clients.get(m[1])
        if conn is not None:
            self.clients.leave(conn, m[2])
            if self.streams is not None:
                self.streams.leave(conn, m[2])

    def _ungroup(self, worker_id: bytes, m: list[Any]) -> None:
        if self.streams is not None:
            for conn in self.clients.members(m[1]).values():
                self.streams.leave(conn, m[1])
        self.clients.ungroup(m[1])

    def _bind_uid(self, worker_id: bytes, m: list[Any]) -> None:
        conn = self.clients.get(m[1])
        if conn is not None:
            self.clients.bind_uid(conn, m[2])

    def _unbind_uid(self, worker_id: bytes, m: list[Any]) -> None:
        conn = self.clients.get(m[1])
        if conn is not None:
            self.clients.unbind_uid(conn, m[2])

    def _set_session(self, worker_id: bytes, m: list[Any]) -> None:
        conn = self.clients.get(m[1])
        if conn is not None:
            p.unpack_session(m[2])  # refuse anything that is not a packed dict
            conn.replace_session(m[2])

    def _update_session(self, worker_id: bytes, m: list[Any]) -> None:
        conn = self.clients.get(m[1])
        if conn is not None:
            session = p.unpack_session(conn.session)
            session.update(p.unpack_session(m[2]))
            conn.replace_session(p.pack_session(session))

    # Members kept through a disconnect (gateway.presence)

    def _keep(self, worker_id: bytes, m: list[Any]) -> None:
        conn = self.clients.get(m[1])
        if conn is not None and self.presence is not None:
            self.presence.keep(conn, m[2], m[3])

    def _park(self, worker_id: bytes, m: list[Any]) -> None:
        if self.presence is not None:
            self.presence.park(worker_id, m)

    def _q_resume(self, client_id: int, secret: str, new_client_id: int) -> Any:
        if self.presence is None:
            return None
        return self.presence.resume(int(client_id), str(secret), int(new_client_id))

    # Queries

    def _query(self, worker_id: bytes, m: list[Any]) -> None:
        req_id, kind, args = m[1], m[2], m[3]
        if kind == p.Q_GROUP_SESSIONS or kind == p.Q_ALL_SESSIONS:
            conns = self.clients.members(args[0]) if args else self.clients.clients
            frame = p.pack_reply_of_sessions(req_id, [conn.entry() for conn in conns.values()])
            self.pool.post(worker_id, frame)
            return
        try:
            result = self._queries[kind](*args)
        except Exception as exc:
            log.warning("bad query kind=%r error=%r", kind, exc)
            result = None
        self._reply(worker_id, req_id, result)

    def _q_session(self, cid: int) -> bytes | None:
        conn = self.clients.get(cid)
        return None if conn is None else conn.session
