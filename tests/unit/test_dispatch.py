"""The worker's dispatch: eager async callbacks, per-client order, errors, session write-back."""

from __future__ import annotations

import asyncio
import types
from typing import Any

from businessworker import api
from businessworker.app import App
from businessworker.dispatch import Dispatcher
from gateway import protocol as p


class FakeLink:
    gateway_id = "g1"
    session = 1

    def __init__(self) -> None:
        self.acks: list[int] = []
        self.frames: list[list[Any]] = []

    def ack(self, seq: int, run: Any) -> None:
        self.acks.append(seq)

    def send_frame(self, frame: bytes, run: Any) -> None:
        self.frames.append(p.unpack(frame))


def app_of(**callbacks: Any) -> App:
    return App.load(types.SimpleNamespace(__name__="fake", **callbacks))  # type: ignore[arg-type]


def message(seq: int, client: int, data: str, session: dict[str, Any] | None = None) -> list[Any]:
    return [p.EVENT_MESSAGE, seq, client, 0, p.pack_session(session or {}), data]


async def test_an_async_callback_that_never_waits_needs_no_task() -> None:
    seen: list[str] = []

    async def on_message(client_id: int, data: str, session: dict[str, Any]) -> None:
        seen.append(data)

    dispatcher, link = Dispatcher(app_of(on_message=on_message)), FakeLink()
    dispatcher.on_event(link, message(1, 7, "a"))  # type: ignore[arg-type]
    assert seen == ["a"] and link.acks == [1] and not dispatcher.tasks


async def test_a_waiting_callback_holds_back_its_clients_next_events_only() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[tuple[int, str]] = []

    async def on_message(client_id: int, data: str, session: dict[str, Any]) -> None:
        if data == "slow":
            await gate
        seen.append((client_id, data))

    dispatcher, link = Dispatcher(app_of(on_message=on_message)), FakeLink()
    for event in (message(1, 7, "slow"), message(2, 7, "after"), message(3, 8, "other")):
        dispatcher.on_event(link, event)  # type: ignore[arg-type]
    assert seen == [(8, "other")]  # client 8 was not held up by client 7
    gate.set_result(None)
    assert await dispatcher.idle(1)
    assert seen == [(8, "other"), (7, "slow"), (7, "after")]
    assert sorted(link.acks) == [1, 2, 3]


async def test_errors_reach_the_coroutine_and_a_failing_callback_is_contained() -> None:
    failing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    caught: list[str] = []

    async def on_message(client_id: int, data: str, session: dict[str, Any]) -> None:
        if data == "catch":
            try:
                await failing
            except ValueError as exc:
                caught.append(str(exc))
        else:
            await asyncio.sleep(0)
            raise RuntimeError("boom")

    dispatcher, link = Dispatcher(app_of(on_message=on_message)), FakeLink()
    dispatcher.on_event(link, message(1, 7, "catch"))  # type: ignore[arg-type]
    dispatcher.on_event(link, message(2, 8, "raise"))  # type: ignore[arg-type]
    failing.set_exception(ValueError("inside"))
    assert await dispatcher.idle(1)
    assert caught == ["inside"]
    assert sorted(link.acks) == [1, 2]  # the failed event counts as handled


async def test_a_changed_session_is_written_back_and_seen_by_the_next_event() -> None:
    sessions: list[dict[str, Any]] = []

    def on_message(client_id: int, data: str, session: dict[str, Any]) -> None:
        sessions.append(dict(session))
        session["n"] = session.get("n", 0) + 1

    dispatcher, link = Dispatcher(app_of(on_message=on_message)), FakeLink()
    api.bind(None)
    # Both events were sent before the gateway applied the first write-back.
    dispatcher.on_event(link, message(1, 7, "a"))  # type: ignore[arg-type]
    dispatcher.on_event(link, message(2, 7, "b"))  # type: ignore[arg-type]
    assert sessions == [{}, {"n": 1}]
    writes = [f for f in link.frames if f[0] == p.SET_SESSION]
    assert [p.unpack_session(f[2]) for f in writes] == [{"n": 1}, {"n": 2}]


async def test_a_dead_gateways_clients_get_on_close() -> None:
    closed: list[tuple[int, dict[str, Any]]] = []

    def on_close(client_id: int, session: dict[str, Any]) -> None:
        closed.append((client_id, session))

    dispatcher, link = Dispatcher(app_of(on_close=on_close)), FakeLink()
    dispatcher.on_event(link, message(1, 7, "hi", {"name": "x"}))  # type: ignore[arg-type]
    adopt = [p.EVENT_ADOPT, [[9, 3, p.pack_session({"name": "y"})]]]
    dispatcher.on_event(link, adopt)  # type: ignore[arg-type]
    dispatcher.gateway_gone(link)  # type: ignore[arg-type]
    assert sorted(closed) == [(7, {"name": "x"}), (9, {"name": "y"})]
    assert link.acks == [1]  # made-up closes are not acknowledged to anybody
