"""CURVE keys for the cluster's internal links (register, gateways, workers).

One cluster keypair, made by ``python -m register keys``, is copied to every
machine. Sockets that bind (the register, each gateway) are CURVE servers with
it; sockets that connect (gateways to the register, workers to both) are CURVE
clients with the same keypair and expect it as the server key. A ZAP handler on
every server lets in only that public key. So only a holder of the secret key
file joins the cluster, and every internal byte is encrypted. A peer with
another key is refused, and the refusal is logged.

Without a key file the links are plain. That is allowed only while everything
binds to loopback (or ipc://); a bind beyond loopback needs a key, or an
explicit ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

log = logging.getLogger("register.keys")

ENV_KEY = "CHAT_CURVE_KEY"
"""Environment variable naming the secret key file, when no option is given."""

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


@dataclass(frozen=True)
class Keys:
    public: bytes
    secret: bytes

    def server(self, sock: zmq.Socket) -> None:
        """Make a binding socket a CURVE server (call before bind)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        """Make a connecting socket a CURVE client of the cluster (call before connect)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.public


def generate(folder: str | Path) -> Path:
    """Write a new cluster keypair into ``folder``; return the secret key file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, secret_file = zmq.auth.create_certificates(str(folder), "cluster")
    os.chmod(secret_file, 0o600)
    return Path(secret_file)


def load(path: str | Path | None) -> Keys | None:
    """Read the secret key file (``path``, else $CHAT_CURVE_KEY); None when neither is set."""
    path = path or os.environ.get(ENV_KEY) or None
    if path is None:
        return None
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"{path} holds no secret key: give the *.key_secret file")
    return Keys(public, secret)


class _OnlyOurs:
    """ZAP credentials check: the cluster's public key, nothing else."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.public:
            return True
        log.warning("refused a peer with an unknown CURVE key key=%s", key.decode())
        return False


def authenticate(ctx: zmq.asyncio.Context, keys: Keys) -> AsyncioAuthenticator:
    """Start the ZAP handler that lets only the cluster key in; stop it on exit."""
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_OnlyOurs(keys.public))
    return auth


def is_local(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// addresses on loopback."""
    url = urlsplit(address)
    if url.scheme in ("ipc", "inproc"):
        return True
    host = (url.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or "*": may be reachable from anywhere


def check_exposure(address: str, keys: Keys | None, insecure: bool) -> None:
    """Refuse to bind beyond loopback without keys, unless told to (--insecure)."""
    if keys is None and not is_local(address):
        if not insecure:
            raise SystemExit(
                f"refusing to bind {address} without CURVE keys: give --curve-key "
                f"(make one with `python -m register keys`) or --insecure"
            )
        log.warning("binding beyond loopback WITHOUT encryption address=%s", address)


def log_handshake_failures(event: dict[str, object]) -> bool:
    """Log a monitor event if it is a failed CURVE handshake; True if it was."""
    kind = event.get("event")
    if isinstance(kind, int) and kind & HANDSHAKE_FAILED:
        log.warning(
            "refused a peer: CURVE handshake failed endpoint=%s event=%s",
            event.get("endpoint", b"").decode(errors="replace"),  # type: ignore[union-attr]
            zmq.Event(kind).name,
        )
        return True
    return False
