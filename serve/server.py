"""Builds the server: LitServe with our transport, routes and supervisor, and runs it until stopped.

Process model: this main process is the supervisor (:mod:`serve.supervisor`: control plane, version
manager, weights source, replacing dead children); API servers are forked uvicorn processes; inference
workers are spawned processes that each hold a model (:mod:`serve.api`). The main process handles
SIGTERM/SIGINT itself (LitServe does not): readiness turns 503 at once, requests keep being served for
``SIMPLENN_DRAIN_S``, then uvicorn finishes in-flight requests, the workers stop, and the process exits
0. SIGHUP re-scans the weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from litserve.specs.base import LitSpec

from serve.api import ServingAPI
from serve.errors import install_error_handlers
from serve.litserve_adapter import AdaptedLitServer
from serve.logs import configure_logging
from serve.process import freeze_heap, supervise_forked_children
from serve.protocols import NativeProtocol, ServingContext, register_protocols
from serve.routes import RequestMiddleware, register_operational_routes
from serve.schemas import RowSchema
from serve.settings import Settings
from serve.status import ServerView
from serve.supervisor import StartupError, Supervisor
from serve.transport import Layout, Transport

logger = logging.getLogger(__name__)
__all__ = ["SimpleNNServer", "StartupError"]


class RoutesSpec(LitSpec):
    """Tells LitServe that the HTTP routes come from ``serve.protocols`` (it registers none itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.api_path = NativeProtocol.path

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output


def litserve_accelerator(device: str) -> str:
    """LitServe's accelerator for ``SIMPLENN_DEVICE``, chosen without importing torch (LitServe's ``auto``
    imports it, in this process, to look for Apple's MPS): ``cuda`` when ``nvidia-smi`` lists a GPU and
    the device is not ``cpu``, else ``cpu`` (a worker then explains a ``cuda`` setting it cannot honour)."""
    if device == "cpu" or shutil.which("nvidia-smi") is None:
        return "cpu"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    return "cuda" if any(line.startswith("GPU") for line in listed.splitlines()) else "cpu"


def check_grpc_port(settings: Settings) -> None:
    """``StartupError`` when the gRPC port is the HTTP port or another process listens on it: the API servers
    bind it with ``SO_REUSEPORT`` and would otherwise share it with that process."""
    if not settings.grpc_port:
        return
    if settings.grpc_port == settings.port:
        raise StartupError(f"SIMPLENN_GRPC_PORT ({settings.grpc_port}) must differ from SIMPLENN_PORT")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.grpc_port))
        except OSError as exc:
            raise StartupError(f"gRPC port {settings.host}:{settings.grpc_port} is not free: {exc.strerror} "
                               "(set SIMPLENN_GRPC_PORT, 0 turns gRPC off)") from None


class SimpleNNServer:
    """One server: its settings, channels, supervisor and the LitServer that runs them."""

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.grpc: Any = None  # the API server's gRPC server (serve.grpc_protocol.GrpcServer)
        layout = Layout(state_dir, settings.resolved_api_servers())
        self.transport = Transport(layout, settings.max_queue_bytes, settings.request_timeout_s,
                                   settings.hang_timeout_s, settings.api_spin_us / 1e6)
        self.supervisor = Supervisor(settings, layout)
        self.view = ServerView(settings.model_name, layout, self.transport,
                               settings.hang_timeout_s + settings.worker_start_timeout_s)
        self.lit_server = AdaptedLitServer(
            ServingAPI(settings, layout, RoutesSpec()), self.transport, self.supervisor, self._add_routes,
            accelerator=litserve_accelerator(settings.device), workers_per_device=settings.workers,
            timeout=settings.request_timeout_s, restart_workers=True)
        install_error_handlers(self.lit_server.app)
        register_operational_routes(self.lit_server.app, settings, self.view)

    def _add_routes(self) -> None:
        """Once the workers serve (the first reported the model's input width; this process never imports
        torch): the protocol routes, and our middleware and protocol router in front of FastAPI. Before any
        API server forks."""
        settings = self.settings
        in_features = self.supervisor.manager.fleet.in_features
        assert in_features is not None
        self.context = ServingContext(settings.model_name, RowSchema(in_features, settings.max_rows), self.transport,
                                      settings.max_body_bytes, self.view.ready, self.view.status)
        protocols = register_protocols(self.lit_server.app, self.context)
        self.lit_server.replace_routes_and_middleware(
            lambda app: RequestMiddleware(protocols.wrap(app), settings, self._on_api_server_start,
                                          self._on_api_server_stop),
            drop_paths=("/", "/health", "/info"))
        freeze_heap()  # what the API servers inherit stays shared and out of their collections

    async def _on_api_server_start(self) -> None:
        """In a freshly forked API server, as its event loop starts: follow the supervisor, serve gRPC."""
        self.view.start(int(os.environ.get("LITSERVE_WORKER_ID", "0")))
        from serve.grpc_protocol import start_grpc  # imported here: no gRPC state in the supervisor's forks

        self.grpc = await start_grpc(self.context, self.settings)
        freeze_heap()

    async def _on_api_server_stop(self) -> None:
        """In an API server whose HTTP requests have finished: stop gRPC, letting RPCs in flight finish."""
        if self.grpc is not None:
            await self.grpc.stop()

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        if self.supervisor.draining:
            return
        self.supervisor.draining = True
        logger.info("%s: not ready from now, draining for %.1f s", signal.Signals(signum).name, self.settings.drain_s)
        self.supervisor.drain()

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then drain and stop every child process."""
        check_grpc_port(self.settings)
        supervise_forked_children()
        self.lit_server.use_logging(lambda: configure_logging(self.settings.log_level))
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, lambda *_: self.supervisor.rescan())
        self.lit_server.run(host=self.settings.host, port=self.settings.port,
                            num_api_servers=self.settings.resolved_api_servers(), log_level=self.settings.log_level,
                            generate_client_file=False, log_config=None, access_log=False,
                            http="httptools", loop="uvloop")
