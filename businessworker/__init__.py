"""Business workers: run an application's callbacks for clients of every gateway.

Write an app as a module of plain or async callbacks (see ``businessworker.app``)
and address clients with ``businessworker.api``; run it with
``python -m businessworker --app yourmodule``.
"""

from businessworker.app import Request, WorkerInfo
from businessworker.cluster import (
    AsyncCluster,
    Cluster,
    ClusterError,
    ClusterUnavailable,
    NotConfirmed,
)

__all__ = [
    "AsyncCluster",
    "Cluster",
    "ClusterError",
    "ClusterUnavailable",
    "NotConfirmed",
    "Request",
    "WorkerInfo",
]
