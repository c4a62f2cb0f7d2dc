"""Background jobs that push to chat users, run by a pool of forked processes.

This is how Celery's prefork workers (and gunicorn's) run: the client is made
once, at import, and every forked process connects on its own at first use.

    python -m examples.background_jobs UID [UID ...]    # beside `make run`
"""

from __future__ import annotations

import json
import sys
from multiprocessing import get_context

from businessworker import Cluster

cluster = Cluster()  # make run's cluster; elsewhere $CHAT_REGISTER and $CHAT_CURVE_KEY


def order_shipped(uid: str, order: int) -> bool:
    """A task: tell the user's open pages; False if the user is not online.

    The key makes a retried task (Celery's autoretry, a crash after the send)
    reach the user once.
    """
    if not cluster.is_uid_online(uid):
        return False
    cluster.send_to_uid(uid, {"type": "shipped", "order": order}, key=f"shipped-{order}")
    return True


def main(uids: list[str]) -> list[bool]:
    with get_context("fork").Pool(4) as pool:
        return pool.starmap(order_shipped, [(uid, n) for n, uid in enumerate(uids)])


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
