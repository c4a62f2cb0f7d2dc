"""The gateway's table of clients, groups and uids."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.clients import ClientTable


def conn(cid: int) -> SimpleNamespace:
    return SimpleNamespace(client_id=cid)  # the table keeps everything else itself


def test_groups_and_uids_are_cleaned_when_a_client_goes() -> None:
    table = ClientTable()
    a, b = conn(1), conn(2)
    for c in (a, b):
        table.add(c)  # type: ignore[arg-type]
        table.join(c, "g")  # type: ignore[arg-type]
    table.bind_uid(a, "u")  # type: ignore[arg-type]
    assert list(table.members("g")) == [1, 2]
    assert table.groups_of(1) == ["g"] and table.uid_of(1) == "u"
    assert table.uids_in("g") == ["u"]
    table.remove(a)  # type: ignore[arg-type]
    assert list(table.members("g")) == [2]
    assert table.of_uid("u") == {} and "u" not in table.uids
    assert table.groups_of(1) == [] and table.uid_of(1) is None
    table.leave(b, "g")  # type: ignore[arg-type]
    assert "g" not in table.groups


def test_rebinding_a_uid_moves_the_client() -> None:
    table = ClientTable()
    a = conn(1)
    table.add(a)  # type: ignore[arg-type]
    table.bind_uid(a, "u1")  # type: ignore[arg-type]
    table.bind_uid(a, "u2")  # type: ignore[arg-type]
    assert "u1" not in table.uids and list(table.of_uid("u2")) == [1]
    table.unbind_uid(a, "u2")  # type: ignore[arg-type]
    assert table.uid_of(1) is None and table.uids == {}


def test_ungroup_keeps_clients() -> None:
    table = ClientTable()
    a = conn(1)
    table.add(a)  # type: ignore[arg-type]
    table.join(a, "g")  # type: ignore[arg-type]
    table.ungroup("g")
    assert table.groups == {} and table.groups_of(1) == [] and len(table) == 1
