"""The Open Inference Protocol (KServe V2) over gRPC, and the gRPC health service, in every API server.

``inference.GRPCInferenceService`` (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer) and ``grpc.health.v1.Health`` (Check, Watch) run on a ``grpc.aio`` server on the API
server's own event loop (uvloop), so a gRPC request takes the HTTP requests' path: the same validated
float32 rows (:func:`serve.protocols.v2_rows`), :meth:`ServingContext.infer` and its batching (a gRPC
and an HTTP request arriving together share one forward pass), limits, version rules, metrics and
request ids. Every API server listens on the shared port (``SO_REUSEPORT``, gRPC's default on Linux);
the kernel spreads connections among them.

* Handlers take the request's bytes and parse them here: a malformed protobuf is INVALID_ARGUMENT
  (gRPC's own failed deserialization would answer INTERNAL) and never reaches a worker; a message over
  ``SIMPLENN_MAX_BODY_BYTES`` is refused by gRPC itself (RESOURCE_EXHAUSTED).
* Errors are :mod:`serve.errors`' typed errors, answered with their ``grpc_code``. The client's deadline
  cancels the RPC (rows already sent to a worker are computed and dropped).
* ``ModelInfer`` answers with ``raw_output_contents`` when the request sent ``raw_input_contents``
  (tritonclient's default), else with typed ``contents.fp32_contents``.
* Shutdown: ServerReady and the health service answer not ready while draining; on the API server's
  lifespan shutdown the server takes no new RPC and lets those in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

import serve
from serve import metrics
from serve.errors import BadInput, MalformedRequest, ModelNotFound, ServeError
from serve.grpc_gen import grpc_predict_v2_pb2 as pb
from serve.grpc_gen import health_pb2
from serve.logs import log_access, new_request_id
from serve.protocols import (V2_OUTPUT, V2_SERVER_NAME, ServingContext, check_v2_names, v2_dtype, v2_model_metadata,
                             v2_rows)
from serve.settings import Settings
from serve.transport import Prediction

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
REQUEST_ID = "x-request-id"
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents"}
Handler = Callable[[Any], Awaitable[Message]]


def infer_rows(context: ServingContext, request: pb.ModelInferRequest) -> tuple[np.ndarray, bool]:
    """A ModelInfer request's validated float32 rows, and whether they came raw (then so does the answer)."""
    check_v2_names([tensor.name for tensor in request.inputs], [output.name for output in request.outputs])
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs) or tensor.HasField("contents"):
            raise BadInput("raw_input_contents must hold one entry per input, and then no input has 'contents'")
        return v2_rows(context.schema, tensor.datatype, tensor.shape, raw=request.raw_input_contents[0]), True
    field = _CONTENTS.get(tensor.datatype)
    if field is None:  # BOOL, BYTES and unknown types are refused here; FP16 has no typed field
        v2_dtype(tensor.datatype)
        raise BadInput(f"inputs[0]: {tensor.datatype} data must come in raw_input_contents")
    stray = [descriptor.name for descriptor, _ in tensor.contents.ListFields() if descriptor.name != field]
    if stray:
        raise BadInput(f"inputs[0]: {tensor.datatype} data goes in contents.{field}, got contents.{stray[0]}")
    return v2_rows(context.schema, tensor.datatype, tensor.shape, data=list(getattr(tensor.contents, field))), False


def infer_response(context: ServingContext, request: pb.ModelInferRequest, prediction: Prediction,
                   raw: bool) -> pb.ModelInferResponse:
    """The answer: one FP32 tensor ``output`` [rows, k], raw or typed as the request was."""
    outputs = prediction.outputs
    response = pb.ModelInferResponse(model_name=context.model_name, model_version=prediction.version,
                                     id=request.id)
    tensor = response.outputs.add(name=V2_OUTPUT, datatype="FP32", shape=outputs.shape)
    if raw:
        response.raw_output_contents.append(np.ascontiguousarray(outputs, dtype="<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(outputs.ravel().tolist())
    return response


class InferenceService:
    """``inference.GRPCInferenceService``: the V2 server, model and inference RPCs (repository RPCs are
    UNIMPLEMENTED: weights change by hot reload)."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context

    async def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.context.ready())

    async def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=V2_SERVER_NAME, version=serve.__version__)

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        self.context.check_model(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=self.context.ready())

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        self.context.check_model(request.name, request.version or None)
        return pb.ModelMetadataResponse(**v2_model_metadata(self.context))

    async def model_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self.context.check_model(request.model_name, request.model_version or None)
        rows, raw = infer_rows(self.context, request)
        prediction = await self.context.infer(rows, BadInput)
        return infer_response(self.context, request, prediction, raw)

    def handlers(self, rpcs: RpcMethods) -> dict[str, grpc.RpcMethodHandler]:
        table: dict[str, tuple[Handler, type[Message], type[Message]]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        }
        return {name: rpcs.unary(INFERENCE_SERVICE, name, *entry) for name, entry in table.items()}


class HealthService:
    """``grpc.health.v1.Health`` for ``""`` (the server) and ``inference.GRPCInferenceService``: SERVING while
    this API server can have a request answered (:meth:`serve.status.ServerView.ready`), NOT_SERVING while
    no worker can answer or the server drains. Watch streams poll every ``poll_s`` and end on stop."""

    SERVICES = ("", INFERENCE_SERVICE)
    Status = health_pb2.HealthCheckResponse

    def __init__(self, ready: Callable[[], bool], poll_s: float = 0.5) -> None:
        self.ready = ready
        self.poll_s = poll_s
        self.stopping = asyncio.Event()

    def status(self, service: str) -> int:
        if service not in self.SERVICES:
            return self.Status.SERVICE_UNKNOWN
        return self.Status.SERVING if self.ready() and not self.stopping.is_set() else self.Status.NOT_SERVING

    async def check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        if request.service not in self.SERVICES:
            raise ModelNotFound(f"unknown service {request.service!r}: this server has {list(self.SERVICES)}")
        return self.Status(status=self.status(request.service))

    async def watch(self, request: health_pb2.HealthCheckRequest) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                yield self.Status(status=status)
                last = status
            if self.stopping.is_set():
                return
            try:
                await asyncio.wait_for(self.stopping.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    def handlers(self, rpcs: RpcMethods) -> dict[str, grpc.RpcMethodHandler]:
        request, response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        return {"Check": rpcs.unary(HEALTH_SERVICE, "Check", self.check, request, response),
                "Watch": rpcs.stream(self.watch, request, response)}


def _parse(message_type: type[Message], data: bytes) -> Message:
    try:
        return message_type.FromString(data)
    except Exception:  # DecodeError, or a string field that is not UTF-8: the client's bytes either way
        raise MalformedRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message") from None


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID:
            return str(value)[:128]
    return new_request_id()


class RecentClients:
    """The gRPC clients (peer addresses: one per connection) that sent an RPC within the last ``window_s``.
    ``grpc.aio`` shows no connection count, and the transport polls for a lone request's answer only while
    one client can be sending (:meth:`serve.transport.Transport.infer`); this is gRPC's part of that count."""

    def __init__(self, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self.last_seen: dict[str, float] = {}
        self._forgotten_at = clock()

    def seen(self, peer: str) -> None:
        """``peer`` sent an RPC now. Once a window, clients gone quiet are forgotten here too, so that many
        short-lived connections under load (when nothing asks for :meth:`count`) cannot pile up."""
        now = self.last_seen[peer] = self.clock()
        if now - self._forgotten_at > self.window_s:
            self._forget(now)

    def count(self) -> int:
        """Clients seen within the window."""
        self._forget(self.clock())
        return len(self.last_seen)

    def _forget(self, now: float) -> None:
        self._forgotten_at = now
        cutoff = now - self.window_s
        for peer in [peer for peer, seen in self.last_seen.items() if seen < cutoff]:
            del self.last_seen[peer]


class RpcMethods:
    """Makes gRPC method handlers of request -> response coroutines, with what every RPC gets: parsing
    (malformed bytes are INVALID_ARGUMENT), the request id (``x-request-id`` metadata or a new one, echoed
    in the trailing metadata), typed errors -> status codes, metrics labelled ``grpc:/<service>/<method>``
    with the status name as ``code``, the access log, and its client in :attr:`clients`."""

    def __init__(self, access_log: bool) -> None:
        self.access_log = access_log
        self.clients = RecentClients()

    def unary(self, service: str, method: str, handler: Handler, request_type: type[Message],
              response_type: type[Message]) -> grpc.RpcMethodHandler:
        route = f"grpc:/{service}/{method}"

        async def call(data: bytes, context: grpc.aio.ServicerContext) -> Message:
            started = time.perf_counter()
            self.clients.seen(context.peer())
            request_id = _request_id(context)
            trailer = ((REQUEST_ID, request_id),)
            context.set_trailing_metadata(trailer)
            code, message = "OK", ""
            metrics.IN_FLIGHT.inc()
            try:
                return await handler(_parse(request_type, data))
            except ServeError as exc:
                code, message = exc.grpc_code, exc.message
                if code == "INTERNAL":
                    logger.warning("answering %s: %s", code, exc.message)
            except asyncio.CancelledError:  # the client went away, or its deadline passed
                remaining = context.time_remaining()
                code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                raise
            except Exception as exc:  # a bug of ours: logged, and INTERNAL without details
                code, message = "INTERNAL", "internal server error"
                logger.error("unexpected error in %s", route, exc_info=exc)
            finally:  # recorded before the client can see the answer (abort sends the status at once)
                metrics.IN_FLIGHT.dec()
                self._record(route, code, time.perf_counter() - started, request_id)
            await context.abort(grpc.StatusCode[code], message, trailer)
            raise AssertionError("unreachable: abort raises")

        return grpc.unary_unary_rpc_method_handler(call, response_serializer=response_type.SerializeToString)

    @staticmethod
    def stream(handler: Callable[[Any], AsyncIterator[Message]], request_type: type[Message],
               response_type: type[Message]) -> grpc.RpcMethodHandler:
        """A server-streaming RPC (health Watch: long-lived, so not in the request metrics)."""

        async def call(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
            try:
                request = _parse(request_type, data)
            except ServeError as exc:
                await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)
            async for message in handler(request):
                yield message

        return grpc.unary_stream_rpc_method_handler(call, response_serializer=response_type.SerializeToString)

    def _record(self, route: str, code: str, elapsed: float, request_id: str) -> None:
        metrics.observe_request(route, code, elapsed)
        if self.access_log:
            log_access(request_id, "GRPC", route[5:], code, elapsed)


class GrpcServer:
    """One API server's gRPC server, on its event loop: both services on ``SIMPLENN_GRPC_PORT`` with
    ``SO_REUSEPORT``, messages up to ``SIMPLENN_MAX_BODY_BYTES``."""

    def __init__(self, context: ServingContext, settings: Settings) -> None:
        self.grace_s = settings.request_timeout_s  # nothing in flight waits longer for its answer
        host = settings.host
        self.address = f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
        self.health = HealthService(context.ready)
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1),
                                               ("grpc.max_receive_message_length", settings.max_body_bytes)])
        rpcs = RpcMethods(settings.access_log)
        self.clients = rpcs.clients
        for service, handlers in ((INFERENCE_SERVICE, InferenceService(context).handlers(rpcs)),
                                  (HEALTH_SERVICE, self.health.handlers(rpcs))):
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            self.server.add_registered_method_handlers(service, handlers)

    async def start(self) -> None:
        """Listen and serve; ``RuntimeError`` when the address cannot be bound."""
        self.server.add_insecure_port(self.address)
        await self.server.start()
        logger.info("gRPC (%s, %s) on %s", INFERENCE_SERVICE, HEALTH_SERVICE, self.address)

    async def stop(self) -> None:
        """Take no new RPC, end health watches, let RPCs in flight finish (up to the request timeout)."""
        self.health.stopping.set()
        await self.server.stop(self.grace_s)


async def start_grpc(context: ServingContext, settings: Settings) -> GrpcServer | None:
    """In an API server as its event loop starts: the gRPC server, or None when ``SIMPLENN_GRPC_PORT`` is 0.

    A port this process cannot bind ends it (the supervisor checked the port at startup and replaces the
    API server): an API server without its gRPC listener would look healthy and answer no gRPC client.
    """
    if not settings.grpc_port:
        return None
    server = GrpcServer(context, settings)
    context.transport.client_counts["grpc"] = server.clients.count
    try:
        await server.start()
    except RuntimeError as exc:
        logger.critical("cannot serve gRPC on %s: %s", server.address, exc)
        logging.shutdown()
        os._exit(1)
    return server


__all__ = ["GrpcServer", "HealthService", "InferenceService", "RecentClients", "RpcMethods", "infer_response",
           "infer_rows", "start_grpc"]
