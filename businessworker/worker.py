"""The business worker process: learns the gateways, links to each, runs the app."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import zmq.asyncio

from businessworker import api, metrics
from businessworker.app import App, WorkerInfo
from businessworker.dispatch import Dispatcher
from businessworker.links import GatewayLinks
from chatcluster import links as timing
from chatcluster.keys import Keys
from chatcluster.process import Lifecycle
from gateway import protocol as gateway_protocol
from register import protocol as register_protocol
from register.client import RegisterClient

log = logging.getLogger("businessworker")

STOP_TIMEOUT = 10.0
"""Seconds a stopping worker waits for running callbacks to finish."""


class Worker(Lifecycle):
    """Stateless: every client fact lives on the gateways, so a worker can die any time."""

    def __init__(
        self,
        app: App,
        registers: Sequence[str],
        *,
        keys: Keys | None = None,
        ctx: zmq.asyncio.Context | None = None,
        link_timeout: float = timing.LINK_TIMEOUT,
    ) -> None:
        super().__init__()
        self.app = app
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.id = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.info = WorkerInfo(self.id, app.name)
        self.dispatcher = Dispatcher(app)
        self.links = GatewayLinks(
            self.ctx,
            self.id,
            self._info,
            self.dispatcher.on_event,
            keys=keys,
            on_gone=self.dispatcher.gateway_gone,
            on_reset=self.dispatcher.abandon,
            link_timeout=link_timeout,
        )
        self.dispatcher.own_run = self.links.own_run
        self.register = RegisterClient(
            registers,
            self._beat,
            self._from_register,
            ctx=self.ctx,
            keys=keys,
            link_timeout=link_timeout,
        )

    async def run(self) -> None:
        api.bind(self.links)
        # Everything this worker runs (its tasks, its sockets' callbacks) is started from
        # here and sees its own links, also beside other workers in one process
        # (businessworker.testing).
        api._bound.set(self.links)
        self.links.start()
        await _maybe_await(self.app.on_worker_start(self.info))
        log.info("worker started id=%s app=%s pid=%d", self.id, self.app.name, os.getpid())
        tasks = [
            self._background(self.register.run()),
            self._background(self._heartbeat()),
        ]
        try:
            await self._stopping.wait()
            await self._drain()
            await _maybe_await(self.app.on_worker_stop(self.info))
        finally:
            for task in tasks:
                task.cancel()
            self.register.bye(self.id)
            self.register.close()
            self.links.close()
            api.bind(None)
            log.info("worker stopped id=%s", self.id)

    async def _drain(self) -> None:
        """Tell every gateway we stop, finish what was already sent to us, ack it."""
        byes = [link.bye() for link in self.links.all()]
        if byes:
            _, late = await asyncio.wait(byes, timeout=5)
            if late:
                log.warning("gateways did not confirm our stop count=%d", len(late))
        if not await self.dispatcher.idle(STOP_TIMEOUT):
            log.warning(
                "stopping with callbacks still running count=%d", len(self.dispatcher.tasks)
            )
        for link in self.links.all():
            link.flush()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(gateway_protocol.HEARTBEAT)
            self.links.heartbeat()

    def _info(self) -> dict[str, Any]:
        return {"id": self.id, "pid": os.getpid()}

    def _beat(self) -> list[Any]:
        return [
            register_protocol.WORKER,
            {
                "id": self.id,
                "started": self.started,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "app": self.app.name,
                "gateways": len(self.links),
                "metrics": metrics.snapshot(self),
            },
        ]

    def _from_register(self, index: int, message: list[Any]) -> None:
        if message[0] == register_protocol.GATEWAYS:
            self.links.update(index, message[2], message[3])
        elif message[0] == register_protocol.PONG:
            self.links.heard_from(index)


async def _maybe_await(result: Any) -> None:
    if inspect.isawaitable(result):
        await result
