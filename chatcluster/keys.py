"""The cluster key: one CURVE keypair shared by every register, gateway and worker.

Every internal link is CURVE by default, on one machine too: a socket that binds
(the register, each gateway) is a CURVE server with the cluster keypair, a
socket that connects is a CURVE client with the same keypair and expects it as
the server's key, and ``chatcluster.auth`` lets in only that public key. So a
peer without the secret key file gets nothing: no command run, no event routed,
no status answered; and every internal byte is encrypted. The secret never
travels: CURVE proves that both ends hold it.

Where the key comes from, first match wins:

1. ``--curve-key FILE`` or ``$CHAT_CURVE_KEY``: a file made by
   ``python -m register keys`` and copied to every machine (mode 600);
2. else the default file ``$CHAT_STATE_DIR/cluster.key_secret`` (by default
   ``~/.local/state/chatcluster/``, or under ``$XDG_STATE_HOME``), made at the
   first start of any member (directory 700, file 600), so that ``make run``
   needs no key step and every process of this account on this machine finds
   the same key.

``--insecure`` is the only way to run without a key (plain links, a WARNING at
start): then any account on the machine, and anyone who can reach the ports,
can act as a member.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth

from chatcluster.cli import OperatorError

log = logging.getLogger("chatcluster.keys")

ENV_KEY = "CHAT_CURVE_KEY"
"""Environment variable naming the secret key file, when no option is given."""
ENV_STATE = "CHAT_STATE_DIR"
"""Environment variable naming the folder of the default key."""
KEY_NAME = "cluster.key_secret"


@dataclass(frozen=True)
class Keys:
    public: bytes
    secret: bytes
    path: Path | None = None

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

    @property
    def fingerprint(self) -> str:
        """The first characters of the public key: enough to tell two keys apart in a log."""
        return self.public[:8].decode()


def state_dir() -> Path:
    """The folder of the default key: $CHAT_STATE_DIR, else the XDG state folder."""
    given = os.environ.get(ENV_STATE)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "chatcluster"


def default_file() -> Path:
    return state_dir() / KEY_NAME


def generate(folder: str | Path, *, fresh: bool = False) -> Path:
    """Write a new cluster keypair into ``folder``; return the secret key file.

    With ``fresh``, a folder that already holds a cluster key is refused: writing
    over it would lock every machine that holds the old key out of the cluster.
    """
    folder = Path(folder)
    existing = folder / KEY_NAME
    if fresh and existing.exists():
        raise OperatorError(
            f"{existing} exists: the cluster key is made once and copied to every machine; "
            f"remove it first to make another, or give another --out"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _, secret_file = zmq.auth.create_certificates(str(folder), "cluster")
        os.chmod(secret_file, 0o600)
    except OSError as exc:
        raise OperatorError(f"cannot write keys into {folder}: {exc.strerror}") from None
    return Path(secret_file)


def load(path: str | Path) -> Keys:
    """Read a secret key file; an unreadable or malformed one is the operator's to fix."""
    path = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except OSError as exc:
        why = exc.strerror or "cannot read it"
        if not path.exists():
            why = "no such file"
        raise OperatorError(
            f"cluster key {path}: {why} (make one with `python -m register keys --out DIR`, "
            f"or give no key to use the default one)"
        ) from None
    except (ValueError, UnicodeDecodeError):
        secret = public = None
    if not secret or not public or not _valid(public, secret):
        raise OperatorError(
            f"cluster key {path} is not a CURVE secret key file: give the *.key_secret "
            f"file that `python -m register keys` wrote"
        )
    _check_mode(path)
    return Keys(public, secret, path)


def ensure(path: Path) -> Keys:
    """Load the key at ``path``, making it first if there is none (atomically:
    every member of a cluster starting at once ends up with the same key)."""
    if not path.exists():
        folder = path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            scratch = tempfile.mkdtemp(prefix=".new-key-", dir=folder)
        except OSError as exc:
            raise OperatorError(
                f"cannot make the cluster key in {folder}: {exc.strerror} "
                f"(set {ENV_STATE} to a folder this account may write, or give --curve-key)"
            ) from None
        try:
            _, secret_file = zmq.auth.create_certificates(scratch, "cluster")
            os.chmod(secret_file, 0o600)
            try:
                os.link(secret_file, path)  # fails if another process was first
                log.info("made the cluster key path=%s", path)
            except FileExistsError:
                pass
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return load(path)


def for_process(given: str | None, *, insecure: bool = False, create: bool = True) -> Keys | None:
    """The keys a member runs with: --curve-key, $CHAT_CURVE_KEY or the default file.

    None only with ``insecure``, which is logged as a WARNING.
    """
    if insecure:
        log.warning(
            "--insecure: the internal links are plain; any local account and anyone "
            "who reaches the internal ports can act as a member of this cluster"
        )
        return None
    path = given or os.environ.get(ENV_KEY) or None
    if path is not None:
        return load(path)
    default = default_file()
    if create:
        return ensure(default)
    if not default.exists():
        raise OperatorError(
            f"no cluster key at {default}: no cluster of this account runs on this machine "
            f"with the default key; give --curve-key (or ${ENV_KEY}), or --insecure"
        )
    return load(default)


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


def check_exposure(address: str, keys: Keys | None) -> None:
    """Say loudly when a plain (--insecure) link is bound beyond loopback."""
    if keys is None and not is_local(address):
        log.warning("binding beyond loopback WITHOUT authentication address=%s", address)


def _valid(public: bytes, secret: bytes) -> bool:
    try:
        return zmq.curve_public(secret) == public
    except (zmq.ZMQError, ValueError):
        return False


def _check_mode(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "the cluster key is readable by other accounts path=%s mode=%o: chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
