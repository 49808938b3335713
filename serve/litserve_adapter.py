"""Every use of LitServe's private internals, in one place (LitServe 0.2.19, pinned in pyproject.toml).

The rest of ``serve/`` uses LitServe's public API only: ``LitAPI`` hooks, ``LitServer``'s arguments and
``run()``, ``LitSpec``, ``LitLoop`` and ``MessageTransport``. :data:`TOUCHPOINTS` lists what this module
relies on; ``tests/test_litserve_adapter.py`` checks each against the installed LitServe and names the
one that moved. The touchpoints, why, and what upstream change would let each go:

* ``LitServer._init_manager(num_api_servers)``: LitServe starts a ``multiprocessing.Manager`` process
  (its request queues, worker status dict and shutdown event) and its own transport. We replace all of
  it: our transport (:mod:`serve.transport`), a plain status dict, and the supervisor as the shutdown
  event, so there is no Manager process and no lock a dead process could hold. *Drop when LitServe
  accepts a transport and a request queue factory as arguments.*
* ``LitServer.verify_worker_status()``: LitServe waits for one worker; we wait for all of them to serve
  the same version, and fail fast with the worker's reason. *Drop with a startup hook.*
* ``LitServer._start_server(port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs)``
  and ``litserve.server._Server``: LitServe forks its API servers once and never replaces one; we fork
  them one at a time so the supervisor can replace a dead one (same code as LitServe's, per index).
  *Drop when LitServe restarts API servers.*
* ``LitServer._start_worker_monitoring(manager, uvicorn_workers)``: LitServe polls its workers every
  ``monitor_internal`` seconds and fails every pending request of a restarted worker; the supervisor
  waits on process sentinels instead (no polling) and the transport fails only the dead worker's
  requests. *Drop when LitServe scopes failures to the dead worker (#340 is related).*
* ``LitServer.launch_single_inference_worker(lit_api, worker_id)`` and ``inference_workers``: how a
  worker is (re)spawned, and the list LitServe's shutdown terminates. *Public-enough; keep.*
* ``LitLoop.__call__(lit_api, device, worker_id, request_queue, transport, workers_setup_status,
  callback_runner)``: the worker loop's signature (``litserve.loops.loops.inference_worker`` calls it).
* ``app.router.routes`` and ``app.user_middleware``: LitServe adds ``/``, ``/health`` and ``/info`` routes
  and a GZip middleware; ours replace them. *Drop with options to disable those routes and middleware.*
* ``LitServer.app`` as the application each API server's uvicorn runs: we give uvicorn our front door
  (request middleware and protocol router) with LitServe's FastAPI app behind it, and turn uvicorn's
  proxy-header rewriting off (nothing here reads a client's address or scheme). A prediction then skips
  three layers it does not use (uvicorn's proxy headers, FastAPI's and Starlette's entry points). FastAPI's
  own OpenTelemetry hook lives in its entry point, so it sees only the routes FastAPI serves; predictions
  are counted by our Prometheus metrics and access log. *Drop when LitServe takes an ASGI middleware to put
  in front of its app.*
* ``uvicorn.server.Server.main_loop`` / ``on_tick`` / ``handle_exit`` (uvicorn's, reached through LitServe's
  ``_Server``): uvicorn wakes every API server 10 times a second to refresh its ``Date`` header and look
  for a stop request; :class:`_ApiServer` ticks once a second (the header's resolution) and is woken at
  once by a stop signal instead, so an idle server costs a tenth of the wake-ups. *Drop when uvicorn
  waits on an event.*
* ``uvicorn.server.Server.server_state.connections`` (uvicorn's set of open client connections): an API
  server polls briefly for a worker's answer only while it has one client (``SIMPLENN_API_SPIN_US``), so
  that a poll never delays another client's request. *Drop when uvicorn reports its connection count.*
* ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.connection_made`` / ``on_response_complete``
  (uvicorn's HTTP/1.1 protocol, the one ``serve.server`` asks for): uvicorn writes a response's head and
  its body with two ``send`` calls, which with ``TCP_NODELAY`` leave as two TCP segments and wake the
  client twice. :class:`OneWriteHttpProtocol` hands uvicorn a transport that holds writes until the
  response is complete (or the event loop's turn ends) and sends them in one call: one segment, one
  wake-up, one system call less per request (measured: +6 % requests/s at 1 and 16 connections, +10 % at
  64). *Drop when uvicorn writes a complete response at once.*
* ``litserve.server.configure_logging``: ``run()`` installs a plain-text log handler; every line of ours is
  JSON. *Drop when ``run()`` takes a ``log_config``.*
"""

from __future__ import annotations

import asyncio
import copy
import multiprocessing as mp
from collections.abc import Callable
from types import FrameType
from typing import Any

import litserve as ls
import litserve.server as litserve_server
import uvicorn
from starlette.middleware.gzip import GZipMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.supervisor import Supervisor
from serve.transport import Transport

TOUCHPOINTS: dict[str, tuple[str, ...]] = {
    "litserve.server.LitServer._init_manager": ("self", "num_api_servers"),
    "litserve.server.LitServer.verify_worker_status": ("self",),
    "litserve.server.LitServer._start_server": ("self", "port", "num_uvicorn_servers", "log_level", "sockets",
                                                "uvicorn_worker_type", "kwargs"),
    "litserve.server.LitServer._start_worker_monitoring": ("self", "manager", "uvicorn_workers"),
    "litserve.server.LitServer.launch_single_inference_worker": ("self", "lit_api", "worker_id"),
    "litserve.server.LitServer._perform_graceful_shutdown": ("self", "manager", "uvicorn_workers",
                                                             "shutdown_reason"),
    "litserve.server._Server.run": ("self", "worker_id", "sockets"),
    "uvicorn.server.Server.main_loop": ("self",),
    "uvicorn.server.Server.on_tick": ("self", "counter"),
    "uvicorn.server.Server.handle_exit": ("self", "sig", "frame"),
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.connection_made": ("self", "transport"),
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.on_response_complete": ("self",),
    "litserve.server.configure_logging": ("level", "format", "stream", "use_rich"),
    "litserve.loops.loops.inference_worker": ("lit_api", "device", "worker_id", "request_queue", "transport",
                                              "workers_setup_status", "callback_runner", "restart_workers"),
    "litserve.loops.base.LitLoop.__call__": ("self", "lit_api", "device", "worker_id", "request_queue",
                                             "transport", "workers_setup_status", "callback_runner"),
}


class _NoManager:
    """Stands in for LitServe's ``multiprocessing.Manager``: there is none to shut down."""

    def shutdown(self) -> None:
        return None


class _ApiServer(litserve_server._Server):
    """LitServe's uvicorn server, ticking once a second and woken at once by a stop signal."""

    _TICKS_PER_WAKE = 10  # uvicorn's on_tick counts tenths of a second; its once-a-second work runs at 0 mod 10

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(self._stop_requested.set)
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + self._TICKS_PER_WAKE) % 864000
            try:
                await asyncio.wait_for(self._stop_requested.wait(), 1.0)
            except TimeoutError:
                pass

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        wake = getattr(self, "_wake", None)
        if wake is not None:
            wake()


class _HeldWrites:
    """An asyncio transport whose writes are held and sent in one call by :meth:`flush`: at the end of a
    response, before the transport closes, or at the latest when the event loop's turn ends (a 100-continue,
    an error page or a streamed body never waits longer). Everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] = []
        self._loop = asyncio.get_running_loop()  # made in connection_made, on the connection's loop

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what is held, in one write (dropped once the connection is closing: nobody reads it)."""
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, sending each response's head and body in one write (see the module's
    list of touchpoints)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HeldWrites(transport))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()


class AdaptedLitServer(ls.LitServer):
    """A ``LitServer`` whose transport, worker supervision and API-server start are ours."""

    def __init__(self, lit_api: ls.LitAPI, transport: Transport, supervisor: Supervisor,
                 on_started: Callable[[], None], **kwargs: Any) -> None:
        self.fast_transport = transport
        self.supervisor = supervisor
        self.on_started = on_started
        super().__init__(lit_api, **kwargs)
        self._api_servers: dict[int, Any] = {}
        self._uvicorn_args: tuple = ()
        self._front: Callable[[Any], Any] = lambda app: app

    def replace_routes_and_middleware(self, front: Callable[[Any], Any], drop_paths: tuple[str, ...]) -> None:
        """Remove LitServe's own routes and GZip middleware; API servers run ``front(app)``, the ASGI app
        that ``front`` puts in front of LitServe's FastAPI app."""
        self.app.router.routes[:] = [r for r in self.app.router.routes if getattr(r, "path", None) not in drop_paths]
        self.app.user_middleware = [m for m in self.app.user_middleware if m.cls is not GZipMiddleware]
        self._front = front

    @staticmethod
    def use_logging(configure: Callable[[], None]) -> None:
        """Make ``LitServer.run()`` configure logging our way."""
        litserve_server.configure_logging = lambda *_, **__: configure()

    # -- LitServe's private hooks ---------------------------------------------------------------
    def _init_manager(self, num_api_servers: int) -> Any:
        self._transport = self.fast_transport
        for lit_api in self.litapi_connector:
            self.litapi_request_queues[lit_api.api_path] = None  # workers read their own connections
        self.workers_setup_status = {}
        self._shutdown_event = self.supervisor  # type: ignore[assignment]
        self.supervisor.start_control()
        return _NoManager()

    def verify_worker_status(self) -> None:
        self.supervisor.wait_started(self.inference_workers)
        self.on_started()
        lit_api = next(iter(self.litapi_connector))
        self.supervisor.supervise("inference worker", lambda i: self.launch_single_inference_worker(lit_api, i),
                                  self.inference_workers)

    def _start_server(self, port: int, num_uvicorn_servers: int, log_level: str, sockets: list, uvicorn_worker_type: str,
                      **kwargs: Any) -> dict[int, Any]:
        self._uvicorn_args = (port, log_level, sockets, kwargs)
        for index in range(num_uvicorn_servers):
            self._api_servers[index] = self._fork_api_server(index)
        self.supervisor.supervise("API server", self._fork_api_server, self._api_servers)
        return self._api_servers

    def _fork_api_server(self, index: int) -> Any:
        """LitServe's ``_start_server`` for one API server (so that one can be replaced)."""
        port, log_level, sockets, kwargs = self._uvicorn_args
        if kwargs.get("http") == "httptools":
            kwargs = {**kwargs, "http": OneWriteHttpProtocol}
        self.app.response_queue_id = index
        config = uvicorn.Config(app=self._front(copy.copy(self.app)), host="0.0.0.0", port=port,
                                log_level=log_level, timeout_graceful_shutdown=self.uvicorn_graceful_timeout,
                                proxy_headers=False, **kwargs)
        server = _ApiServer(config=config)
        self.fast_transport.client_counts["http"] = lambda: len(server.server_state.connections)
        process = mp.get_context("fork").Process(target=server.run, args=(index, sockets), name=f"LitServer-{index}")
        process.start()
        return process

    def _start_worker_monitoring(self, manager: Any, uvicorn_workers: Any) -> None:
        return None  # the supervisor replaces dead children from the main thread (Supervisor.wait)
