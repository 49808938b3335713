"""The floor: a no-op ASGI app that answers every request with the same small JSON.

It drains the request body (so uploads cost what they cost) and does nothing else: no routing, no
parsing, no model. Whatever it reaches on a given machine is the ceiling that uvicorn plus the load
generator allow, and every other server is read against it.

Run: ``uvicorn bench.apps.floor_app:app --loop uvloop --http httptools``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b'{"output":0.0,"model_version":"floor"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown so uvicorn does not log lifespan errors."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer any HTTP request (any method, any path) with 200 and ``BODY``."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    more_body = True
    while more_body:
        message = await receive()
        more_body = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
