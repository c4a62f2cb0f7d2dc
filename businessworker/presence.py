"""Members kept through a disconnect: the worker's side of the app's grace period.

``api.keep_member`` makes a client a *kept* member: its gateway keeps it, away,
for the grace after its socket goes (``gateway.presence``), and the app gives
the client the token it returns. A new connection that shows the token calls
``api.resume``, which takes the member out of wherever it waits and gives its
session, groups and uid to the new connection: the app carries on with the
same member and nobody sees it leave. A member that does not come back leaves
once, by its on_close, when the grace ends.

Each kept client's session carries a small record under ``MEMBER_KEY``: its
secret, its grace, and the groups and uid it was given in its own callbacks.
That is what lets the worker that served it park it on a live gateway when its
own gateway dies (the dead gateway's table is gone with it): ``Parker``.

The token is ``gateway_id.client_id.secret``: the secret, 128 random bits, is
what makes a member's identity impossible to take over by guessing ids.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway import protocol as p
from gateway.link import GatewayLink, Run, encode_park

if TYPE_CHECKING:
    from businessworker.links import GatewayLinks

log = logging.getLogger("businessworker.presence")

MEMBER_KEY = "__member__"
"""The session key of a kept member's record (reserved: do not set it yourself)."""
DEFAULT_GRACE = 10.0
PARK_WAIT = 1.0
"""Seconds a resume goes on looking for a member whose gateway was declared gone:
the workers that served its clients park them as they learn it, each at its own
moment."""
RESUME_RETRY = 0.1
NO_GATEWAY_RETRY = 0.2
"""Seconds between two tries to park a member while no gateway is linked."""


def new_secret() -> str:
    return secrets.token_hex(16)


def token_of(gateway_id: str, client_id: int, secret: str) -> str:
    return f"{gateway_id}.{client_id}.{secret}"


def parse_token(token: Any) -> tuple[str, int, str] | None:
    """(gateway id, client id, secret) of a token, or None for anything else."""
    if not isinstance(token, str) or len(token) > 128:
        return None
    parts = token.split(".")
    if len(parts) != 3 or not parts[1].isdecimal() or len(parts[2]) != 32:
        return None
    return parts[0], int(parts[1]), parts[2]


def member_of(packed: bytes) -> dict[str, Any] | None:
    """The member record in a packed session, if the client is kept."""
    if MEMBER_KEY.encode() not in packed:  # cheap: most sessions are not kept
        return None
    try:
        member = p.unpack_session(packed).get(MEMBER_KEY)
    except ValueError:
        return None
    return member if isinstance(member, dict) and "secret" in member else None


class Parker:
    """Parks the kept members of a dead gateway on live ones (see the module docstring)."""

    def __init__(
        self,
        links: Callable[[], GatewayLinks | None],
        own_run: Callable[[], Run],
        served: dict[str, dict[int, tuple[int, bytes]]],
        close: Callable[[GatewayLink, int, int, bytes], None],
    ) -> None:
        self.links = links
        self.own_run = own_run
        self.served = served
        """the dispatcher's: the holder's entry makes us the member's worker there"""
        self.close = close
        """run on_close for a member no gateway could take within its grace"""

    def park(self, gone: GatewayLink, client_id: int, version: int, packed: bytes) -> bool:
        """Park a client of the dead gateway ``gone`` if it is kept; False if it is not."""
        member = member_of(packed)
        if member is None:
            return False
        grace = float(member.get("grace", DEFAULT_GRACE))
        loop = asyncio.get_running_loop()
        self._try(gone, client_id, version, packed, member, loop.time() + grace)
        return True

    def _try(
        self,
        gone: GatewayLink,
        client_id: int,
        version: int,
        packed: bytes,
        member: dict[str, Any],
        deadline: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        cluster = self.links()
        live = sorted(cluster.all(), key=lambda link: link.gateway_id) if cluster else []
        if not live:
            if loop.time() >= deadline:
                self.close(gone, client_id, version, packed)
            else:
                loop.call_later(
                    NO_GATEWAY_RETRY, self._try, gone, client_id, version, packed, member, deadline
                )
            return
        holder = live[client_id % len(live)]
        holder.send_frame(
            encode_park(
                client_id,
                version,
                packed,
                [str(g) for g in member.get("groups") or ()],
                member.get("uid"),
                str(member["secret"]),
                max(0.0, deadline - loop.time()),
            ),
            self.own_run(),
        )
        self.served.setdefault(holder.gateway_id, {})[client_id] = (version, packed)
