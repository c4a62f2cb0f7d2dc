"""The life of a member process (register, gateway, worker): one home for all three.

``Lifecycle`` is what each role's main object inherits: ``stop()`` (from a
signal, or from a background task that failed: a member stops rather than limp
on), ``failed`` for the exit code, and ``_background`` to start such tasks.
``serve`` runs one in the foreground of ``python -m ROLE``: SIGTERM and SIGINT
stop it cleanly, and its exit code says whether it failed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, Protocol

log = logging.getLogger("chatcluster.process")


class Lifecycle:
    """Stopping and background tasks, the same for every role."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()
        self.failed = False
        """a background task failed: the process exits with 1"""

    def stop(self) -> None:
        """Stop cleanly (run() returns once it has)."""
        self._stopping.set()

    def _background(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a task for the life of the process; if it fails, stop rather than limp on."""
        task = asyncio.create_task(coro)
        task.add_done_callback(self._crashed)
        return task

    def _crashed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("background task failed, stopping", exc_info=task.exception())
            self.failed = True
            self.stop()


class Member(Protocol):
    failed: bool

    def stop(self) -> None: ...

    async def run(self) -> None: ...


async def serve(member: Member) -> int:
    """Run ``member`` until it stops; SIGTERM and SIGINT stop it. 1 if it failed, else 0."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, member.stop)
    await member.run()
    return 1 if member.failed else 0
