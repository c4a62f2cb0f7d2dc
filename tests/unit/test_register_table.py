"""The register's table: joining, expiry, goodbyes, prefix ownership."""

from __future__ import annotations

from register.table import Table


def gateway(
    gid: str, prefixes: list[int], address: str = "tcp://127.0.0.1:1", **extra: object
) -> dict:
    return {
        "id": gid,
        "address": address,
        "prefixes": prefixes,
        "started": 1.0,
        "connections": 0,
        "workers": 0,
        **extra,
    }


def test_a_gateway_joins_and_beats() -> None:
    table = Table(expiry=3)
    assert table.gateway_seen(gateway("g1", [10]), now=0) == []
    version = table.version
    # A beat with only counters changed does not bother the workers.
    table.gateway_seen(gateway("g1", [10], connections=5), now=1)
    assert table.version == version
    assert table.gateway_entries()[0]["connections"] == 5
    # A new prefix or address does.
    table.gateway_seen(gateway("g1", [10, 11]), now=2)
    assert table.version > version


def test_silent_members_expire() -> None:
    table = Table(expiry=3)
    table.gateway_seen(gateway("g1", [10]), now=0)
    table.gateway_seen(gateway("g2", [20]), now=2)
    table.worker_seen({"id": "w1"}, now=0)
    assert table.expire(now=2.5) == []
    assert table.expire(now=4) == ["g1"]
    assert [e["id"] for e in table.gateway_entries()] == ["g2"]
    assert table.worker_entries() == []
    # Its prefix is free again.
    assert table.gateway_seen(gateway("g3", [10]), now=4) == []


def test_goodbye_forgets_at_once() -> None:
    table = Table(expiry=3)
    table.gateway_seen(gateway("g1", [10]), now=0)
    assert table.worker_seen({"id": "w1"}, now=0) is True
    assert table.worker_seen({"id": "w1"}, now=1) is False
    table.forget("g1")
    table.forget("w1")
    assert table.gateway_entries() == [] and table.worker_entries() == []


def test_a_prefix_belongs_to_its_first_holder() -> None:
    table = Table(expiry=3)
    table.gateway_seen(gateway("g1", [10]), now=0)
    # A second gateway claiming the same prefix is refused, even if it started earlier.
    assert table.gateway_seen(gateway("g2", [10], started=0.5), now=0) == [10]
    assert table.gateways["g2"].entry["prefixes"] == []
    assert table.owners[10] == "g1"
    # It claims another and is accepted.
    assert table.gateway_seen(gateway("g2", [11]), now=1) == []
    assert table.owners == {10: "g1", 11: "g2"}


def test_a_restarted_register_learns_everything_from_beats() -> None:
    table = Table(expiry=3)  # a fresh table, as after a restart
    beats = [gateway("g1", [10, 12]), gateway("g2", [11])]
    for beat in beats:
        assert table.gateway_seen(beat, now=0) == []
    assert {e["id"]: e["prefixes"] for e in table.gateway_entries()} == {"g1": [10, 12], "g2": [11]}


def test_a_lost_link_drops_a_member_only_if_it_does_not_come_back() -> None:
    table = Table(expiry=30, grace=2)
    table.gateway_seen(gateway("g1", [10]), now=0)
    table.gateway_seen(gateway("g2", [20]), now=0)
    table.worker_seen({"id": "w1"}, now=0)
    for member in ("g1", "g2", "w1"):
        table.link_lost(member, now=1)
    table.gateway_seen(gateway("g2", [20]), now=1.5)  # reconnected and beat again: stays
    assert table.expire(now=2.9) == []  # within the grace
    assert table.expire(now=3.1) == ["g1"]
    assert [e["id"] for e in table.gateway_entries()] == ["g2"]
    assert table.worker_entries() == []


def test_a_busy_member_keeps_its_place_until_the_backstop() -> None:
    table = Table(expiry=30, grace=2)
    table.gateway_seen(gateway("g1", [10]), now=0)
    assert table.expire(now=20) == []  # no beat for 20 s, but its link never dropped
    assert table.expire(now=31) == ["g1"]
