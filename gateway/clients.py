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
    """client id -> connection, group -> members, uid -> connections, and each
    client's own groups and uid: the one place that writes any of them."""

    __slots__ = ("_groups_of", "_uid_of", "clients", "groups", "uids", "watch")

    def __init__(self) -> None:
        self.clients: dict[int, ClientConnection] = {}
        self.groups: dict[str, dict[int, ClientConnection]] = {}
        self.uids: dict[str, dict[int, ClientConnection]] = {}
        self._groups_of: dict[int, set[str]] = {}
        """client id -> its groups (only clients in at least one)"""
        self._uid_of: dict[int, str] = {}
        """client id -> its uid (only bound clients)"""
        self.watch: Callable[[str, bool], None] | None = None
        """told when a group gets its first member here (True) or loses its last (False)"""

    def __len__(self) -> int:
        return len(self.clients)

    def __iter__(self) -> Iterator[ClientConnection]:
        return iter(self.clients.values())

    def get(self, client_id: int) -> ClientConnection | None:
        return self.clients.get(client_id)

    def groups_of(self, client_id: int) -> list[str]:
        """The groups a client is in, sorted."""
        return sorted(self._groups_of.get(client_id, ()))

    def uid_of(self, client_id: int) -> str | None:
        """The uid a client is bound to, or None."""
        return self._uid_of.get(client_id)

    def add(self, conn: ClientConnection) -> None:
        self.clients[conn.client_id] = conn

    def remove(self, conn: ClientConnection) -> None:
        """Forget a closed client, with its groups and uid."""
        client_id = conn.client_id
        self.clients.pop(client_id, None)
        groups = self._groups_of.pop(client_id, None)
        if groups:
            for group in groups:
                self._leave_group(group, client_id)
        uid = self._uid_of.pop(client_id, None)
        if uid is not None:
            self._discard(self.uids, uid, client_id)

    def join(self, conn: ClientConnection, group: str) -> None:
        members = self.groups.get(group)
        if members is None:
            members = self.groups[group] = {}
            if self.watch is not None:
                self.watch(group, True)
        members[conn.client_id] = conn
        groups = self._groups_of.get(conn.client_id)
        if groups is None:
            self._groups_of[conn.client_id] = {group}
        else:
            groups.add(group)

    def leave(self, conn: ClientConnection, group: str) -> None:
        groups = self._groups_of.get(conn.client_id)
        if groups and group in groups:
            groups.discard(group)
            if not groups:
                del self._groups_of[conn.client_id]
            self._leave_group(group, conn.client_id)

    def ungroup(self, group: str) -> None:
        members = self.groups.pop(group, None)
        if members is None:
            return
        for client_id in members:
            groups = self._groups_of.get(client_id)
            if groups:
                groups.discard(group)
                if not groups:
                    del self._groups_of[client_id]
        if self.watch is not None:
            self.watch(group, False)

    def bind_uid(self, conn: ClientConnection, uid: str) -> None:
        old = self._uid_of.get(conn.client_id)
        if old == uid:
            return
        if old is not None:
            self._discard(self.uids, old, conn.client_id)
        self._uid_of[conn.client_id] = uid
        self.uids.setdefault(uid, {})[conn.client_id] = conn

    def unbind_uid(self, conn: ClientConnection, uid: str) -> None:
        if self._uid_of.get(conn.client_id) == uid:
            del self._uid_of[conn.client_id]
            self._discard(self.uids, uid, conn.client_id)

    def members(self, group: str) -> dict[int, ClientConnection]:
        return self.groups.get(group, {})

    def of_uid(self, uid: str) -> dict[int, ClientConnection]:
        return self.uids.get(uid, {})

    def uids_in(self, group: str) -> list[str]:
        """The uids bound to a group's members here, each once."""
        uid_of = self._uid_of
        return list({uid_of[cid] for cid in self.members(group) if cid in uid_of})

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
