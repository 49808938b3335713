"""Builds the LitServer: routes, health, metrics, status, admin, and process lifecycle.

Process model (LitServe's): this main process supervises; API servers are forked uvicorn
processes; inference workers are spawned processes that each hold a model (see ``serve.api``).
The main process handles SIGTERM/SIGINT itself (LitServe does not): readiness turns 503 at once,
requests keep being served for ``SIMPLENN_DRAIN_S``, then uvicorn finishes in-flight requests, the
workers stop, and the process exits 0. SIGHUP asks every worker to re-scan its weights.
"""

from __future__ import annotations

import hmac
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import litserve as ls
import litserve.server as litserve_server
from litserve.specs.base import LitSpec
from fastapi import FastAPI
from litserve.utils import WorkerSetupStatus
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve import metrics
from serve.api import Control, ServingAPI
from serve.errors import NotReady, Unauthorized, install_error_handlers
from serve.loader import import_model_class, input_features
from serve.logs import configure_logging
from serve.process import supervise_forked_children
from serve.protocols import NativeProtocol, ServingContext, register_protocols
from serve.registry import read_worker_statuses
from serve.schemas import RowSchema
from serve.settings import Settings
from serve.transport import Transport

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("simplenn.access")


class StartupError(Exception):
    """The server could not start (bad weights, bad model class, no device); one line of reason."""


class RoutesSpec(LitSpec):
    """Tells LitServe that the HTTP routes come from ``serve.protocols`` (it registers none itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.api_path = NativeProtocol.path

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output


class RequestMiddleware:
    """Pure ASGI middleware: request id, access log, request metrics; also configures logging per process."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    @staticmethod
    def route_label(scope: dict) -> str:
        """The matched route's path template (bounded label values), or ``unmatched``."""
        return getattr(scope.get("route"), "path", "unmatched")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            configure_logging(self.settings.log_level)
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
                break
        request_id = request_id or os.urandom(12).hex()
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            metrics.IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            route = self.route_label(scope)
            metrics.REQUESTS.labels(route=route, code=str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route=route).observe(elapsed)
            if self.settings.access_log:
                access_logger.info("request", extra={"request_id": request_id, "method": scope["method"],
                                                     "path": scope["path"], "status": status,
                                                     "ms": round(elapsed * 1000, 3)})


class SimpleNNServer(ls.LitServer):
    """LitServer with the fast transport, our routes, readiness and signal handling."""

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.status_dir = state_dir / "status"
        self.status_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.status_dir.iterdir():
            stale.unlink()
        try:
            model_class = import_model_class(settings.model_class)
            self.schema = RowSchema(input_features(model_class), settings.max_rows)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.control = Control()
        self.draining = mp.get_context("spawn").Value("b", 0, lock=False)
        self.fast_transport = Transport(settings.resolved_api_servers(), settings.max_queue_bytes,
                                        settings.request_timeout_s)
        api = ServingAPI(settings, self.control, RoutesSpec(), self.status_dir)
        super().__init__(api, accelerator="cpu" if settings.device == "cpu" else "auto",
                         workers_per_device=settings.workers, timeout=settings.request_timeout_s,
                         restart_workers=True)
        self.monitor_internal = 0.5  # LitServe's worker liveness check period (seconds)
        # LitServe's own "/", "/health" (text) and "/info" (configuration) routes: ours replace them.
        self.app.router.routes[:] = [r for r in self.app.router.routes
                                     if getattr(r, "path", None) not in ("/", "/health", "/info")]
        # Tiny JSON answers gain nothing from gzip, and it costs every response.
        self.app.user_middleware = [m for m in self.app.user_middleware if m.cls is not GZipMiddleware]
        install_error_handlers(self.app)
        protocols = register_protocols(self.app, ServingContext(
            settings.model_name, self.schema, self.fast_transport, settings.max_body_bytes, self.ready,
            self.model_status))
        self._register_operational_routes(self.app)
        # The app's outermost layers: request id / metrics / access log, then the protocol routes, then
        # FastAPI's own stack for everything else (Starlette builds the stack on the first request).
        build_fastapi_stack = self.app.build_middleware_stack
        self.app.build_middleware_stack = lambda: RequestMiddleware(  # type: ignore[method-assign]
            protocols.wrap(build_fastapi_stack()), settings)

    # -- LitServe hooks ------------------------------------------------------------------------
    def _init_manager(self, num_api_servers: int) -> Any:
        """Keep LitServe's manager (worker status, shutdown event) but move requests to our transport."""
        manager = super()._init_manager(num_api_servers)
        self._transport = self.fast_transport
        for lit_api in self.litapi_connector:
            self.litapi_request_queues[lit_api.api_path] = self.fast_transport.requests
        return manager

    def launch_single_inference_worker(self, lit_api: Any, worker_id: int) -> Any:
        """LitServe calls this to replace a dead worker: tell the API servers first (they fail its requests).
        While draining nothing is replaced (the dead process stays in the list and is reaped at shutdown)."""
        old = self.inference_workers[self._worker_index(lit_api, worker_id)]
        if self.draining.value:
            return old
        logger.error("inference worker %d died; starting a new one", worker_id)
        self.fast_transport.worker_restarts.value += 1
        metrics.mark_process_dead(old.pid)
        (self.status_dir / f"startup-error-{worker_id}.txt").unlink(missing_ok=True)
        return super().launch_single_inference_worker(lit_api, worker_id)

    def _worker_index(self, lit_api: Any, worker_id: int) -> int:
        offset = 0
        for api in self.litapi_connector:
            if api is lit_api:
                return offset + worker_id
            offset += len(self._inference_workers_config_for_api(api.api_path))
        raise ValueError("unknown LitAPI")

    def verify_worker_status(self) -> None:
        """Wait until every worker is ready; fail fast with the worker's one-line reason if one is not."""
        while True:
            states = list(self.workers_setup_status.values())
            if states and all(s == WorkerSetupStatus.READY for s in states):
                return
            dead = [w for w in self.inference_workers if not w.is_alive()]
            if dead or WorkerSetupStatus.ERROR in states:
                reasons = sorted({p.read_text() for p in self.status_dir.glob("startup-error-*.txt")})
                for worker in self.inference_workers:
                    worker.kill()
                self.workers_setup_status.clear()
                raise StartupError(reasons[0] if reasons else "an inference worker failed to start")
            time.sleep(0.05)

    # -- routes --------------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when not draining and every inference worker has loaded and warmed up its model."""
        if self.draining.value:
            return False
        try:
            states = list(self.workers_setup_status.values())
        except Exception:  # the manager is gone: shutting down
            return False
        return bool(states) and all(s == WorkerSetupStatus.READY for s in states)

    def model_status(self) -> dict[str, Any]:
        """Live version (and each worker's), for the status route."""
        workers = read_worker_statuses(self.status_dir)
        versions = sorted({w["version"] for w in workers if w.get("version")})
        return {"name": self.settings.model_name, "ready": self.ready(),
                "version": versions[0] if len(versions) == 1 else None, "versions": versions, "workers": workers}

    def _check_admin(self, request: Request) -> None:
        token = self.settings.admin_token
        assert token is not None
        supplied = request.headers.get("authorization", "")
        expected = "Bearer " + token.get_secret_value()
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise Unauthorized("a valid 'Authorization: Bearer <SIMPLENN_ADMIN_TOKEN>' header is required")

    def _register_operational_routes(self, app: FastAPI) -> None:
        @app.get("/health/live", tags=["health"], summary="200 while the process serves")
        async def live() -> Response:
            return JSONResponse({"status": "live"})

        @app.get("/health/ready", tags=["health"], summary="200 once every worker serves; 503 otherwise")
        async def ready() -> Response:
            if not self.ready():
                raise NotReady("not ready: workers are loading or the server is draining")
            return JSONResponse({"status": "ready"})

        @app.get("/metrics", tags=["health"], summary="Prometheus metrics of all processes")
        async def metrics_route() -> Response:
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

        if self.settings.admin_token is None:
            return

        @app.post("/admin/reload", tags=["admin"], summary="Re-scan the weights now (bearer token)")
        async def admin_reload(request: Request) -> Response:
            self._check_admin(request)
            self.control.request_rescan()
            return JSONResponse({"status": "rescan requested"}, status_code=202)

        @app.post("/admin/rollback", tags=["admin"], summary="Serve the previous good version (bearer token)")
        async def admin_rollback(request: Request) -> Response:
            self._check_admin(request)
            self.control.request_rollback()
            return JSONResponse({"status": "rollback requested"}, status_code=202)

    # -- lifecycle -----------------------------------------------------------------------------
    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        if self.draining.value:
            return
        self.draining.value = 1
        logger.info("%s: not ready from now, draining for %.1f s", signal.Signals(signum).name, self.settings.drain_s)

        def finish() -> None:
            time.sleep(self.settings.drain_s)
            self._shutdown_event.set()

        threading.Thread(target=finish, name="drain", daemon=True).start()

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then drain and stop every child process."""
        supervise_forked_children()
        # LitServer.run() installs LitServe's plain-text log handler; keep every line JSON instead.
        litserve_server.configure_logging = lambda *_, **__: configure_logging(self.settings.log_level)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, lambda *_: self.control.request_rescan())
        self.run(host=self.settings.host, port=self.settings.port,
                 num_api_servers=self.settings.resolved_api_servers(), log_level=self.settings.log_level,
                 generate_client_file=False, log_config=None, access_log=False,
                 http="httptools", loop="uvloop")
