"""The API server's own routes (health, metrics, admin) and its outermost middleware.

``/health/live`` and ``/health/ready`` answer from :class:`serve.status.ServerView`; ``/admin/reload``
and ``/admin/rollback`` exist only when ``SIMPLENN_ADMIN_TOKEN`` is set and need it as a bearer token
(constant-time comparison). :class:`RequestMiddleware` gives every request an id, counts it in the
metrics and writes the access log; on the lifespan's start it sets up the API server process (and
starts its gRPC server), on the lifespan's shutdown it stops what ``on_stop`` names (the gRPC server).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve import metrics
from serve.errors import NotLive, NotReady, Unauthorized
from serve.logs import configure_logging, log_access, new_request_id
from serve.settings import Settings
from serve.status import ServerView



class RequestMiddleware:
    """Pure ASGI middleware: request id, access log, request metrics; also configures logging per process."""

    def __init__(self, app: Any, settings: Settings, on_start: Callable[[], Awaitable[None]],
                 on_stop: Callable[[], Awaitable[None]]) -> None:
        self.app = app
        self.settings = settings
        self.on_start = on_start
        self.on_stop = on_stop

    @staticmethod
    def route_label(scope: dict) -> str:
        """The matched route's path template (bounded label values), or ``unmatched``."""
        return getattr(scope.get("route"), "path", "unmatched")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            configure_logging(self.settings.log_level)
            await self.on_start()
            return await self.app(scope, self._stop_on_shutdown(receive), send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
                break
        request_id = request_id or new_request_id()
        status, recorded = 500, False

        def record() -> None:
            nonlocal recorded
            recorded = True
            metrics.IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            route = self.route_label(scope)
            metrics.observe_request(route, str(status), elapsed)
            if self.settings.access_log:
                log_access(request_id, scope["method"], scope["path"], status, elapsed)

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            elif message["type"] == "http.response.body" and not message.get("more_body") and not recorded:
                record()  # before the last bytes go out: a client that reads its answer finds it counted
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not recorded:  # no complete answer: an error before the body, or the client went away
                record()

    def _stop_on_shutdown(self, receive: Any) -> Callable[[], Awaitable[dict]]:
        """The lifespan's ``receive``, running ``on_stop`` when shutdown comes (uvicorn sends it once its
        HTTP requests have finished)."""

        async def receive_and_stop() -> dict:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.on_stop()
            return message

        return receive_and_stop


def check_admin(settings: Settings, request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <SIMPLENN_ADMIN_TOKEN>``."""
    token = settings.admin_token
    assert token is not None
    supplied = request.headers.get("authorization", "")
    expected = "Bearer " + token.get_secret_value()
    if not hmac.compare_digest(supplied.encode(), expected.encode()):
        raise Unauthorized("a valid 'Authorization: Bearer <SIMPLENN_ADMIN_TOKEN>' header is required")


def register_operational_routes(app: FastAPI, settings: Settings, view: ServerView) -> None:
    """Health, metrics and (with a token) admin routes."""

    @app.get("/health/live", tags=["health"], summary="200 unless this server is stuck (then restart the pod)")
    async def live() -> Response:
        stuck = view.stuck_for()
        if stuck is not None:
            raise NotLive(f"not live: no progress on pending requests, or no inference worker, for {stuck:.0f} s")
        return JSONResponse({"status": "live"})

    @app.get("/health/ready", tags=["health"], summary="200 while a worker can answer; 503 otherwise")
    async def ready() -> Response:
        if not view.ready():
            raise NotReady("not ready: no inference worker can answer now, or the server is draining")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of all processes")
    async def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if settings.admin_token is None:
        return

    @app.post("/admin/reload", tags=["admin"], summary="Re-scan the weights now (bearer token)")
    async def admin_reload(request: Request) -> Response:
        check_admin(settings, request)
        view.command("rescan")
        return JSONResponse({"status": "rescan requested"}, status_code=202)

    @app.post("/admin/rollback", tags=["admin"], summary="Serve the previous good version (bearer token)")
    async def admin_rollback(request: Request) -> Response:
        check_admin(settings, request)
        view.command("rollback")
        return JSONResponse({"status": "rollback requested"}, status_code=202)
