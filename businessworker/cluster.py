"""Reach clients from any Python process: the worker's API, outside any worker.

    from businessworker import Cluster

    cluster = Cluster()          # make run's cluster on this machine, nothing to set
    cluster.send_to_uid("42", {"type": "notice", "text": "your order shipped"})
    if cluster.is_uid_online("42"): ...

``Cluster`` is for threads (Django, Flask, Celery, scripts): every method blocks
until it is done, and one object may be shared by every thread of a process.
``AsyncCluster`` is the same for asyncio code (FastAPI, aiohttp): every method
is a coroutine and nothing blocks the loop. Both have every command and query of
``businessworker.api``, with the same names, arguments and results (they run
the same functions), plus ``key=`` on commands.

Where the cluster is: ``register=`` (an address or a list), else
``$CHAT_REGISTER`` (comma-separated), else ``tcp://127.0.0.1:1236``; its key:
``curve_key=`` (a file), else ``$CHAT_CURVE_KEY``, else this account's default
key file (the one ``make run`` makes), or ``insecure=True`` for a cluster
started ``--insecure``. The register tells the client every gateway, and keeps
it up to date as gateways come and go; the client links to each, as a worker
does, but is given no client events (its HELLO says ``role: publisher``).

What "done" means: a command returns once every gateway it went to confirmed
that it carried it out (the frames are on their way to the clients' sockets);
if that takes longer than ``timeout`` (5 s by default) it raises
``NotConfirmed``, and may still take effect later: send it again with the same
``key`` to be sure it takes effect once. A gateway that went away meanwhile
counts as done (its clients are gone). Commands from one client reach each
gateway in the order they were called. Queries answer as in a worker.

Idempotency: a command with ``key=K`` takes effect once per gateway within
``KEY_WINDOW`` (10 minutes) of the first, however often it is sent with that key
and from whichever process. The object also remembers the keys it had
confirmed, so a retry from it is answered at once even after a gateway restart;
a retry from another process after a gateway restart can reach the restarted
gateway's (reconnected) clients again.

The first call connects (``connect()`` does it up front); ``ClusterUnavailable``
says that no gateway could be reached within ``timeout``. ``close()`` (or a
``with`` block) ends every link; a ``Cluster`` also stops its thread. After a
``fork()`` (gunicorn, Celery prefork) the child never touches the parent's
sockets or thread: it connects anew on its first call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import itertools
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio

from businessworker import api
from businessworker.links import GatewayLinks
from chatcluster import keys as curve
from chatcluster import links as timing
from gateway import protocol as gateway_protocol
from gateway.dedup import KEY_PREFIX, KEY_WINDOW
from gateway.link import Batch, Run
from gateway.workers import PUBLISHER
from register import protocol as register_protocol
from register.client import RegisterClient, register_addresses

DEFAULT_TIMEOUT = 5.0

COMMANDS = (
    "send_to_client",
    "send_to_clients",
    "send_to_all",
    "send_to_group",
    "send_to_uid",
    "close_client",
    "join_group",
    "leave_group",
    "ungroup",
    "bind_uid",
    "unbind_uid",
    "set_session",
    "update_session",
)
"""``api`` functions that change something: acknowledged, and may carry ``key=``."""
QUERIES = (
    "is_online",
    "is_uid_online",
    "get_session",
    "get_uid_by_client_id",
    "get_client_ids_by_uid",
    "get_client_sessions_by_group",
    "get_client_ids_by_group",
    "get_uids_by_group",
    "get_client_count_by_group",
    "get_all_group_ids",
    "get_all_client_count",
    "get_all_client_sessions",
)


class ClusterError(Exception):
    """Something the cluster did not do."""


class ClusterUnavailable(ClusterError, TimeoutError):
    """No gateway could be reached (no register answered, or it lists none)."""


class NotConfirmed(ClusterError, TimeoutError):
    """A command went out but not every gateway confirmed it in time."""


class _Scope:
    """What ``api`` asks of the callback it runs in: here, only the run to tag commands by."""

    __slots__ = ("run",)
    client_id = None
    session: dict[str, Any] = {}  # never written: no client's callback runs here

    def __init__(self, run: Run) -> None:
        self.run = run

    def flush(self) -> None:
        pass


class AsyncCluster:
    """The cluster's API for asyncio code; see the module docstring."""

    def __init__(
        self,
        register: str | Sequence[str] | None = None,
        *,
        curve_key: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        link_timeout: float = timing.LINK_TIMEOUT,
    ) -> None:
        self.registers = register_addresses([register] if isinstance(register, str) else register)
        self.curve_key = None if curve_key is None else str(curve_key)
        self.insecure = insecure
        self.timeout = float(timeout)
        self.link_timeout = link_timeout
        self.id = "publisher-" + uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._keys: dict[str, tuple[float, asyncio.Future[Any]]] = {}
        """idempotency keys sent from here -> (when, the outcome)"""
        self._pid = os.getpid()
        self._since = time.time()
        self._started: asyncio.Future[None] | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._links: GatewayLinks | None = None
        self._register: RegisterClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # Lifecycle

    async def connect(self) -> None:
        """Link to the cluster now (the first call does it anyway); ClusterUnavailable if
        no gateway is reachable within ``timeout``."""
        if os.getpid() != self._pid:
            self._forget_parent()
        started = self._started
        if started is not None and started.done() and started.exception() is None:
            if self._links is not None and len(self._links):
                return
            await self._gateway()  # every gateway went away: wait a moment for one
            return
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._started)
        except ClusterUnavailable:
            self._started = None  # the next call tries again
            await self._stop()
            raise

    async def _start(self) -> None:
        keys = curve.for_process(self.curve_key, insecure=self.insecure, create=False)
        self._ctx = zmq.asyncio.Context()
        self._links = GatewayLinks(
            self._ctx,
            self.id,
            lambda: {"id": self.id, "pid": os.getpid(), "role": PUBLISHER},
            lambda link, message: None,  # no client events come to a publisher
            keys=keys,
            link_timeout=self.link_timeout,
        )
        self._links.start()
        self._register = RegisterClient(
            self.registers,
            self._beat,
            self._from_register,
            ctx=self._ctx,
            keys=keys,
            link_timeout=self.link_timeout,
        )
        self._tasks = [
            asyncio.ensure_future(self._register.run()),
            asyncio.ensure_future(self._heartbeat()),
        ]
        await self._gateway()

    async def _gateway(self) -> None:
        """Until a gateway is linked; ClusterUnavailable after ``timeout``."""
        deadline = time.monotonic() + self.timeout
        while self._links is None or not len(self._links):
            if time.monotonic() > deadline:
                raise ClusterUnavailable(
                    f"no gateway of the cluster at {', '.join(self.registers)} answered "
                    f"within {self.timeout:g} s (is it running, with this key?)"
                )
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """End every link (what was sent is flushed first)."""
        self._started = None
        await self._stop()

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._links is not None:
            self._links.close()
            self._links = None
        if self._register is not None:
            self._register.bye(self.id)
            self._register.close()
            self._register = None
        if self._ctx is not None:
            self._ctx.destroy(linger=1000)
            self._ctx = None

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's links without touching them."""
        _ORPHANS.append((self._ctx, self._links, self._register, self._tasks, self._started))
        self._pid = os.getpid()
        self._ctx = self._links = self._register = self._started = None
        self._tasks = []
        self._keys = {}

    async def __aenter__(self) -> AsyncCluster:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _beat(self) -> list[Any]:
        return [
            register_protocol.WORKER,
            {
                "id": self.id,
                "role": PUBLISHER,
                "started": self._since,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "gateways": len(self._links) if self._links is not None else 0,
            },
        ]

    def _from_register(self, index: int, message: list[Any]) -> None:
        if self._links is None:
            return
        if message[0] == register_protocol.GATEWAYS:
            self._links.update(index, message[2], message[3])
        elif message[0] == register_protocol.PONG:
            self._links.heard_from(index)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(gateway_protocol.HEARTBEAT)
            if self._links is not None:
                self._links.heartbeat()

    # Calls

    async def _command(self, fn: Callable[..., Any], args: Any, kwargs: Any, key: Any) -> Any:
        if key is None:
            return await self._run(fn, args, kwargs, Run(self.id, next(self._seq), None))
        key = str(key)
        now = time.monotonic()
        for old in [k for k, (at, _) in self._keys.items() if now - at > KEY_WINDOW]:
            del self._keys[old]
        known = self._keys.get(key)
        if known is not None:
            outcome = known[1]
            failed = outcome.done() and (outcome.cancelled() or outcome.exception() is not None)
            if not failed:  # done, or under way: the same outcome, nothing sent again
                return await asyncio.shield(outcome)
        outcome = asyncio.ensure_future(self._run(fn, args, kwargs, Run(KEY_PREFIX + key, 0, None)))
        self._keys[key] = (now, outcome)
        return await asyncio.shield(outcome)

    async def _run(self, fn: Callable[..., Any], args: Any, kwargs: Any, run: Run) -> Any:
        await self.connect()
        bound = api._bound.set(self._links)
        scope = api._scope.set(_Scope(run))
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self.timeout)
        finally:
            api._scope.reset(scope)
            api._bound.reset(bound)
        if run.batches:
            await self._confirmed(list(run.batches.values()))
        return result

    async def _query(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        await self.connect()
        bound = api._bound.set(self._links)
        try:
            return await asyncio.wait_for(fn(*args, **kwargs), self.timeout)
        finally:
            api._bound.reset(bound)

    async def _confirmed(self, batches: list[Batch]) -> None:
        pending = [b for b in batches if not b.receipted]
        if not pending:
            return
        done = asyncio.get_running_loop().create_future()
        left = [len(pending)]

        def one() -> None:
            left[0] -= 1
            if left[0] == 0 and not done.done():
                done.set_result(None)

        for batch in pending:
            batch.waiters.append(one)
        try:
            await asyncio.wait_for(done, self.timeout)
        except TimeoutError:
            raise NotConfirmed(
                f"{left[0]} gateway(s) did not confirm within {self.timeout:g} s; it may "
                f"still take effect: send it again with the same key to be sure of once"
            ) from None

    def keep_history(self, group: str, *, count: int = 200, seconds: float = 300.0) -> None:
        """As ``api.keep_history``: say so here too for the groups your app keeps history
        of, so that what you send them joins their stream (or import your app's module)."""
        api.keep_history(group, count=count, seconds=seconds)

    @property
    def gateways(self) -> list[str]:
        """Ids of the gateways linked now."""
        return [link.gateway_id for link in self._links.all()] if self._links else []


class Cluster:
    """The cluster's API for threads; see the module docstring. Thread-safe."""

    def __init__(
        self,
        register: str | Sequence[str] | None = None,
        *,
        curve_key: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        link_timeout: float = timing.LINK_TIMEOUT,
    ) -> None:
        self._options = {
            "register": register,
            "curve_key": curve_key,
            "insecure": insecure,
            "timeout": timeout,
            "link_timeout": link_timeout,
        }
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._async: AsyncCluster | None = None
        _LIVE.add(self)

    def _runner(self) -> tuple[asyncio.AbstractEventLoop, AsyncCluster]:
        with self._lock:
            if os.getpid() != self._pid:
                self._forget_parent()
            if self._loop is None or self._async is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="chatcluster-client", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
                self._async = AsyncCluster(**self._options)  # type: ignore[arg-type]
            return self._loop, self._async

    def _forget_parent(self) -> None:
        _ORPHANS.append((self._loop, self._thread, self._async))
        self._pid = os.getpid()
        self._loop = self._thread = self._async = None

    def _call(self, make: Callable[[AsyncCluster], Any]) -> Any:
        loop, cluster = self._runner()
        future = asyncio.run_coroutine_threadsafe(make(cluster), loop)
        try:
            return future.result(3 * self.timeout + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ClusterUnavailable(f"no answer within {3 * self.timeout + 1:g} s") from None

    def connect(self) -> None:
        """Link to the cluster now; ClusterUnavailable if no gateway is reachable in time."""
        self._call(lambda c: c.connect())

    def close(self) -> None:
        """End every link and stop this object's thread (a later call starts them again)."""
        with self._lock:
            if os.getpid() != self._pid:
                self._forget_parent()
            loop, thread, cluster = self._loop, self._thread, self._async
            self._loop = self._thread = self._async = None
        if loop is None or thread is None or cluster is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(cluster.close(), loop).result(self.timeout + 5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self.timeout + 5)
            loop.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep_history(self, group: str, *, count: int = 200, seconds: float = 300.0) -> None:
        """As ``api.keep_history`` (see ``AsyncCluster.keep_history``)."""
        api.keep_history(group, count=count, seconds=seconds)

    @property
    def gateways(self) -> list[str]:
        """Ids of the gateways linked now (connecting first)."""
        return self._call(_linked_gateways)


async def _linked_gateways(cluster: AsyncCluster) -> list[str]:
    await cluster.connect()
    return cluster.gateways


def _async_method(name: str, command: bool) -> Callable[..., Any]:
    fn = getattr(api, name)
    if command:

        async def method(self: AsyncCluster, *args: Any, key: Any = None, **kwargs: Any) -> Any:
            return await self._command(fn, args, kwargs, key)
    else:

        async def method(self: AsyncCluster, *args: Any, **kwargs: Any) -> Any:
            return await self._query(fn, args, kwargs)

    return _like(method, fn, name, command)


def _sync_method(name: str, command: bool) -> Callable[..., Any]:
    fn = getattr(api, name)

    def method(self: Cluster, *args: Any, **kwargs: Any) -> Any:
        return self._call(lambda c: getattr(c, name)(*args, **kwargs))

    return _like(method, fn, name, command)


def _like(method: Any, fn: Any, name: str, command: bool) -> Any:
    """Give a generated method the api function's name, docstring and signature."""
    functools.update_wrapper(method, fn, assigned=("__name__", "__qualname__", "__doc__"))
    del method.__wrapped__
    signature = inspect.signature(fn)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += signature.parameters.values()
    if command:
        params.append(inspect.Parameter("key", inspect.Parameter.KEYWORD_ONLY, default=None))
    method.__signature__ = signature.replace(parameters=params)
    return method


for _name in COMMANDS + QUERIES:
    setattr(AsyncCluster, _name, _async_method(_name, _name in COMMANDS))
    setattr(Cluster, _name, _sync_method(_name, _name in COMMANDS))

_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()
_ORPHANS: list[Any] = []
"""What a forked child inherited from its parent's clients: kept, never touched or
collected (closing or collecting a ZeroMQ context in the child could hang it)."""


def _after_fork_in_child() -> None:
    for cluster in list(_LIVE):
        cluster._lock = threading.Lock()  # another thread of the parent may have held it
        cluster._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)
