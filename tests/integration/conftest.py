from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster


@pytest.fixture(scope="module")
def chat_cluster() -> Iterator[Cluster]:
    """2 gateways and 4 workers running the chat, shared by a module's tests."""
    with Cluster(gateways=2, workers=4) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def probe_cluster() -> Iterator[Cluster]:
    """2 gateways and 2 workers running the API probe app."""
    with Cluster(gateways=2, workers=2, app="tests.apps.probe") as cluster:
        yield cluster
