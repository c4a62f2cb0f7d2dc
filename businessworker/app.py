"""Loading an application module and what its callbacks receive.

An application is any importable module defining some of these functions,
plain or ``async def``:

    on_worker_start(worker)                       once, before any event
    on_connect(client_id, session)                a client connected
    on_websocket_connect(client_id, request, session)
                                                  its handshake details; return False to refuse
    on_message(client_id, message, session)       message: str (text frame) or bytes (binary)
    on_close(client_id, session)                  the client is gone
    on_worker_stop(worker)                        once, on a clean stop

``session`` is the client's session dict: change it in place and the change is
written back to the client's gateway when the callback returns (or before the
callback's next query).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs

CALLBACKS = (
    "on_worker_start",
    "on_connect",
    "on_websocket_connect",
    "on_message",
    "on_close",
    "on_worker_stop",
)


@dataclass(frozen=True, slots=True)
class Request:
    """The WebSocket handshake of a client, as its gateway saw it."""

    path: str
    query: str
    headers: list[tuple[str, str]]
    peer: str
    """"ip:port" of the client as seen by the gateway"""

    def header(self, name: str, default: str | None = None) -> str | None:
        """First value of a header, case-insensitively."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    @property
    def params(self) -> dict[str, list[str]]:
        """The query string, parsed."""
        return parse_qs(self.query)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What on_worker_start / on_worker_stop receive."""

    id: str
    app: str


def _ignore(*args: Any) -> None:
    return None


@dataclass(frozen=True, slots=True)
class App:
    name: str
    on_worker_start: Callable[..., Any]
    on_connect: Callable[..., Any]
    on_websocket_connect: Callable[..., Any]
    on_message: Callable[..., Any]
    on_close: Callable[..., Any]
    on_worker_stop: Callable[..., Any]

    @classmethod
    def load(cls, module: str | ModuleType) -> App:
        mod = importlib.import_module(module) if isinstance(module, str) else module
        found = {name: getattr(mod, name, None) for name in CALLBACKS}
        if not any(found.values()):
            raise ValueError(f"module {mod.__name__} defines none of {', '.join(CALLBACKS)}")
        return cls(name=mod.__name__, **{k: v or _ignore for k, v in found.items()})
