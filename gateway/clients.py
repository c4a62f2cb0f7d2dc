"""The gateway's table of its own clients, their groups and their uids.

Groups and uids live on the gateway that holds the clients, as in
GatewayWorker: a worker that sends to a group sends one command to every
gateway, and each gateway writes to its own members.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.connection import ClientConnection


class ClientTable:
    """client id -> connection, group -> members, uid -> connections."""

    __slots__ = ("clients", "groups", "uids", "watch")

    def __init__(self) -> None:
        self.clients: dict[int, ClientConnection] = {}
        self.groups: dict[str, dict[int, ClientConnection]] = {}
        self.uids: dict[str, dict[int, ClientConnection]] = {}
        self.watch: Callable[[str, bool], None] | None = None
        """told when a group gets its first member here (True) or loses its last (False)"""

    def __len__(self) -> int:
        return len(self.clients)

    def __iter__(self) -> Iterator[ClientConnection]:
        return iter(self.clients.values())

    def get(self, client_id: int) -> ClientConnection | None:
        return self.clients.get(client_id)

    def add(self, conn: ClientConnection) -> None:
        self.clients[conn.client_id] = conn

    def remove(self, conn: ClientConnection) -> None:
        """Forget a closed client, with its groups and uid."""
        self.clients.pop(conn.client_id, None)
        if conn.groups:
            for group in conn.groups:
                self._leave_group(group, conn.client_id)
            conn.groups = None
        if conn.uid is not None:
            self._discard(self.uids, conn.uid, conn.client_id)
            conn.uid = None

    def join(self, conn: ClientConnection, group: str) -> None:
        members = self.groups.get(group)
        if members is None:
            members = self.groups[group] = {}
            if self.watch is not None:
                self.watch(group, True)
        members[conn.client_id] = conn
        if conn.groups is None:
            conn.groups = set()
        conn.groups.add(group)

    def leave(self, conn: ClientConnection, group: str) -> None:
        if conn.groups and group in conn.groups:
            conn.groups.discard(group)
            self._leave_group(group, conn.client_id)

    def ungroup(self, group: str) -> None:
        members = self.groups.pop(group, None)
        if members is None:
            return
        for conn in members.values():
            if conn.groups:
                conn.groups.discard(group)
        if self.watch is not None:
            self.watch(group, False)

    def bind_uid(self, conn: ClientConnection, uid: str) -> None:
        if conn.uid == uid:
            return
        if conn.uid is not None:
            self._discard(self.uids, conn.uid, conn.client_id)
        conn.uid = uid
        self.uids.setdefault(uid, {})[conn.client_id] = conn

    def unbind_uid(self, conn: ClientConnection, uid: str) -> None:
        if conn.uid == uid:
            self._discard(self.uids, uid, conn.client_id)
            conn.uid = None

    def members(self, group: str) -> dict[int, ClientConnection]:
        return self.groups.get(group, {})

    def of_uid(self, uid: str) -> dict[int, ClientConnection]:
        return self.uids.get(uid, {})

    def _leave_group(self, group: str, client_id: int) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.pop(client_id, None)
            if not members:
                del self.groups[group]
                if self.watch is not None:
                    self.watch(group, False)

    @staticmethod
    def _discard(index: dict[str, dict[int, ClientConnection]], key: str, client_id: int) -> None:
        members = index.get(key)
        if members is not None:
            members.pop(client_id, None)
            if not members:
                del index[key]
