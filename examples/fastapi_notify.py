"""A web app that pushes to chat users: ``POST /notify/{uid}``.

    pip install fastapi uvicorn
    uvicorn examples.fastapi_notify:app        # beside `make run`

The body is a JSON object; it reaches every open connection of user ``uid``
as ``{"type": "notice", ...body}``. The answer says whether the user was online.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from businessworker import AsyncCluster

cluster = AsyncCluster()  # make run's cluster; elsewhere $CHAT_REGISTER and $CHAT_CURVE_KEY


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await cluster.close()


app = FastAPI(lifespan=lifespan)


@app.post("/notify/{uid}")
async def notify(uid: str, body: dict[str, Any]) -> dict[str, bool]:
    online = await cluster.is_uid_online(uid)
    if online:
        await cluster.send_to_uid(uid, {"type": "notice", **body})
    return {"online": online}
