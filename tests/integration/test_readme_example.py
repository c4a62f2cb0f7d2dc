"""The README's example app, run for real: the README stays true to the code."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.cluster import ROOT, Cluster


@pytest.fixture(scope="module")
def readme_cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# echo_rooms\.py.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 22
    folder: Path = tmp_path_factory.mktemp("readme_app")
    (folder / "echo_rooms.py").write_text(code)
    with Cluster(gateways=2, workers=2, app="echo_rooms", env={"PYTHONPATH": str(folder)}) as c:
        yield c


async def recv(ws) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def test_the_readme_example_works(readme_cluster: Cluster) -> None:
    async with (
        connect(readme_cluster.ws_url(0)) as a,
        connect(readme_cluster.ws_url(1) + "?token=ok") as b,
    ):
        hello_a, hello_b = await recv(a), await recv(b)
        await a.send("/join lobby")
        assert await recv(a) == {"joined": "lobby", "members": 1}
        await b.send("/join lobby")
        assert await recv(b) == {"joined": "lobby", "members": 2}
        await a.send("hi")
        assert await recv(b) == {"from": hello_a["hello"], "text": "hi"}
        assert await recv(a) == {"from": hello_a["hello"], "text": "hi"}
        await b.close()
        assert await recv(a) == {"left": hello_b["hello"]}


async def test_the_readme_example_refuses_a_banned_token(readme_cluster: Cluster) -> None:
    async with connect(readme_cluster.ws_url(0) + "?token=banned") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv(ws)
        assert closed.value.rcvd.code == 1008
