"""The worker's dispatch: client events -> application callbacks, in order per client.

Plain callbacks run inline. An ``async def`` callback also starts inline and
runs until it first waits for something (as Python 3.12's eager tasks do); one
that never waits (a broadcast, say) costs no task at all. One that does wait
goes on in a task, and while it runs the same client's later events wait
behind it, so every client's events are handled in order while other clients
go on.

A callback that raises is logged with its client id; the event still counts as
handled, nothing else is touched, and the worker carries on.

The dispatcher also remembers which clients it serves on each gateway, with
their latest session. That is the one thing a worker keeps, and only for
recovery: when a gateway dies it cannot send close events, so each worker runs
on_close for its own clients of that gateway (or, for members the app keeps
through a disconnect, parks them on a live gateway: ``businessworker.presence``).
Gateways re-announce a dead worker's clients to their new workers (ADOPT), so
every client stays known.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Any

from businessworker import api
from businessworker.app import App, Request
from businessworker.metrics import COUNTS
from businessworker.presence import Parker
from gateway import protocol as p
from gateway.ids import prefix_of
from gateway.link import GatewayLink, Run, encode_set_session, when_receipted

log = logging.getLogger("businessworker.dispatch")

EVENT_NAMES = {p.EVENT_CONNECT: "connect", p.EVENT_MESSAGE: "message", p.EVENT_CLOSE: "close"}


class Scope:
    """One callback run: its client, its session, and how to write the session back."""

    __slots__ = ("client_id", "dispatcher", "link", "packed", "run", "session", "version")

    def __init__(
        self,
        dispatcher: Dispatcher,
        link: GatewayLink,
        client_id: int,
        version: int,
        packed: bytes,
        session: dict[str, Any],
        run: Run,
    ) -> None:
        self.dispatcher = dispatcher
        self.run = run
        """what its commands are counted by, and whether its event is still ours"""
        self.link = link
        self.client_id = client_id
        self.version = version
        self.packed = packed
        self.session = session

    def flush(self) -> None:
        """Write the session back to the gateway if the callback changed it."""
        try:
            packed = p.pack_session(self.session)
        except (TypeError, ValueError) as exc:
            log.error("session not serialisable client=%d error=%r", self.client_id, exc)
            return
        if packed != self.packed:
            self.link.send_frame(encode_set_session(self.client_id, packed), self.run)
            self.packed = packed
            self.version += 1
            self.dispatcher.sessions[self.client_id] = (self.version, packed)
            served = self.dispatcher.served.get(self.link.gateway_id)
            if served is not None and self.client_id in served:
                served[self.client_id] = (self.version, packed)


class Dispatcher:
    """Runs the app's callbacks for events arriving on any gateway link."""

    def __init__(self, app: App, own_run: Callable[[], Run] | None = None) -> None:
        self.app = app
        self.own_run = own_run or (lambda: Run("worker", 0, None))
        """the run of commands no event caused (made-up closes of a dead gateway)"""
        self.parker = Parker(api.linked, lambda: self.own_run(), {}, self._close_gone)
        self._scopes: dict[asyncio.Future[None], Scope] = {}
        self.busy: dict[int, deque[tuple[GatewayLink, list[Any]]]] = {}
        self.sessions: dict[int, tuple[int, bytes]] = {}
        """Sessions this worker changed, with their version, until the gateway's
        copy catches up: an event already in flight carries the older copy."""
        self.served: dict[str, dict[int, tuple[int, bytes]]] = {}
        """gateway id -> {client id: (version, packed session)} of the clients we serve"""
        self.parker.served = self.served
        self.tasks: set[asyncio.Future[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def on_event(self, link: GatewayLink, message: list[Any]) -> None:
        if message[0] == p.EVENT_ADOPT:
            served = self.served.setdefault(link.gateway_id, {})
            for client_id, version, packed in message[1]:
                served[client_id] = (version, packed)
            return
        queue = self.busy.get(message[2])
        if queue is not None:
            queue.append((link, message))
        else:
            self._run(link, message)

    async def idle(self, timeout: float) -> bool:
        """Wait until no callback is running (for a clean stop)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _run(self, link: GatewayLink, message: list[Any]) -> None:
        started = perf_counter()
        op, seq, client_id, version, packed = message[:5]
        cached = self.sessions.get(client_id)
        if cached is not None:
            if cached[0] > version:
                version, packed = cached
            else:
                del self.sessions[client_id]
        served = self.served.setdefault(link.gateway_id, {})
        if op == p.EVENT_CLOSE:
            served.pop(client_id, None)
        else:
            served[client_id] = (version, packed)
        try:
            session = p.unpack_session(packed)
        except ValueError:
            session = {}
        run = Run(prefix_of(client_id), seq, link) if seq is not None else self.own_run()
        scope = Scope(self, link, client_id, version, packed, session, run)
        token = api._scope.set(scope)
        try:
            result = self._call(op, client_id, session, message)
            if inspect.iscoroutine(result):
                result = _start(result)
            if inspect.isawaitable(result):
                self.busy[client_id] = deque()
                self._idle.clear()
                task = asyncio.ensure_future(self._finish_later(result, scope, seq, op, started))
                self.tasks.add(task)
                self._scopes[task] = scope
                task.add_done_callback(self._task_done)
                return
        except Exception:
            COUNTS.exceptions += 1
            log.exception("callback failed client=%d event=%s", client_id, EVENT_NAMES.get(op))
        finally:
            api._scope.reset(token)
        self._done(scope, seq, op)
        COUNTS.handled(op, started)

    def _call(self, op: int, client_id: int, session: dict[str, Any], message: list[Any]) -> Any:
        app = self.app
        if op == p.EVENT_MESSAGE:
            return app.on_message(client_id, message[5], session)
        if op == p.EVENT_CLOSE:
            if len(message) > 5 and message[5]:
                return None  # a kept member that came back as another client
            return app.on_close(client_id, session)
        if op == p.EVENT_CONNECT:
            path, query, headers, peer = message[5]
            request = Request(path, query, [(k, v) for k, v in headers], peer)
            first = app.on_connect(client_id, session)
            if inspect.isawaitable(first):
                return self._connect_later(first, client_id, request, session)
            return self._websocket_connect(client_id, request, session)
        raise ValueError(f"unknown event {op}")

    async def _connect_later(
        self, first: Any, client_id: int, request: Request, session: dict[str, Any]
    ) -> None:
        await first
        result = self._websocket_connect(client_id, request, session)
        if inspect.isawaitable(result):
            await result

    def _websocket_connect(self, client_id: int, request: Request, session: dict[str, Any]) -> Any:
        verdict = self.app.on_websocket_connect(client_id, request, session)
        if inspect.isawaitable(verdict):
            return self._refuse_later(verdict, client_id)
        if verdict is False:
            api.close_client(client_id, code=1008)
        return None

    async def _refuse_later(self, verdict: Any, client_id: int) -> None:
        if await verdict is False:
            api.close_client(client_id, code=1008)

    async def _finish_later(
        self, awaitable: Any, scope: Scope, seq: int, op: int, started: float
    ) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            if not scope.run.stale:
                raise  # the worker is stopping
        except Exception:
            if not scope.run.stale:
                COUNTS.exceptions += 1
                log.exception(
                    "callback failed client=%d event=%s", scope.client_id, EVENT_NAMES.get(op)
                )
        if not scope.run.stale:
            self._done(scope, seq, op)
            COUNTS.handled(op, started)
        self._next(scope.client_id)

    def _task_done(self, task: asyncio.Future[None]) -> None:
        self.tasks.discard(task)
        self._scopes.pop(task, None)
        if not self.tasks:
            self._idle.set()

    def abandon(self, link: GatewayLink) -> None:
        """``link`` is in a new session: drop every run of its old one (the gateway
        gave those events to other workers), and what we knew of its clients."""
        for task, scope in list(self._scopes.items()):
            if scope.run.stale:
                task.cancel()
        for client_id, queue in self.busy.items():
            if any(entry[0] is link for entry in queue):
                self.busy[client_id] = deque(e for e in queue if e[0] is not link)
        served = self.served.pop(link.gateway_id, {})
        for client_id in served:
            self.sessions.pop(client_id, None)
        log.info(
            "dropped a gateway's session gateway=%s clients=%d cancelled=%d",
            link.gateway_id,
            len(served),
            sum(1 for scope in self._scopes.values() if scope.run.stale),
        )

    def gateway_gone(self, link: GatewayLink) -> None:
        """A gateway died: its clients are gone; run on_close for the ones we served."""
        served = self.served.pop(link.gateway_id, {})
        parked = 0
        for client_id, (version, packed) in served.items():
            if self.parker.park(link, client_id, version, packed):
                parked += 1
            else:
                self._close_gone(link, client_id, version, packed)
        COUNTS.gateways_lost += 1
        COUNTS.closes_made_up += len(served) - parked
        log.log(
            logging.WARNING if served else logging.INFO,
            "gateway gone, closing its clients gateway=%s clients=%d parked=%d",
            link.gateway_id,
            len(served) - parked,
            parked,
        )

    def _close_gone(self, link: GatewayLink, client_id: int, version: int, packed: bytes) -> None:
        self.on_event(link, [p.EVENT_CLOSE, None, client_id, version, packed])

    def _done(self, scope: Scope, seq: int | None, op: int) -> None:
        if op == p.EVENT_CLOSE:
            self.sessions.pop(scope.client_id, None)
        else:
            scope.flush()
        if seq is None:  # a close made up for a dead gateway: nobody to ack
            return
        run, link = scope.run, scope.link
        if run.batches:  # commands to other gateways: ack once they have them
            when_receipted(
                list(run.batches.values()), lambda: link.ack(seq, run), link.link_timeout
            )
        else:
            link.ack(seq, run)

    def _next(self, client_id: int) -> None:
        queue = self.busy.pop(client_id, None)
        while queue:
            link, message = queue.popleft()
            self._run(link, message)
            if client_id in self.busy:  # went async again: the rest waits behind it
                self.busy[client_id].extend(queue)
                return


class _Suspended:
    """A coroutine that ran inline up to its first wait, and what it waits for."""

    __slots__ = ("coro", "waiting_for")

    def __init__(self, coro: Any, waiting_for: Any) -> None:
        self.coro = coro
        self.waiting_for = waiting_for

    def __await__(self) -> Any:
        return _drive(self.coro, self.waiting_for).__await__()


def _start(coro: Any) -> Any:
    """Run a coroutine inline until it first suspends; None if it finished."""
    try:
        waiting_for = coro.send(None)
    except StopIteration:
        return None
    return _Suspended(coro, waiting_for)


async def _drive(coro: Any, waiting_for: Any) -> None:
    """Go on with a started coroutine, as a task would: wait for what it yielded, resume it.

    Python 3.12's ``asyncio.eager_task_factory`` does this (a task that runs inline
    until it first waits); 3.11, which this project supports, has no supported way.
    A future yielded by a coroutine carries ``_asyncio_future_blocking = True``
    (asyncio's own protocol between futures and tasks, the same on 3.11-3.13): a
    task clears it before waiting on the future, and so must we. On 3.12 and later
    this could be replaced by creating the task with ``eager_start``.
    """
    while True:
        try:
            if waiting_for is None:  # a bare yield: just give the loop a turn
                await asyncio.sleep(0)
            else:
                waiting_for._asyncio_future_blocking = False
                await asyncio.wait((waiting_for,))  # its outcome reaches the coroutine below
        except asyncio.CancelledError as exc:
            try:
                waiting_for = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting_for = coro.send(None)
        except StopIteration:
            return
