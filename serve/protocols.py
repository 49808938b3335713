"""The HTTP prediction protocols: native ``/predict``, KServe V1 and the Open Inference Protocol (V2).

Every protocol decodes its body into the same validated rows (:mod:`serve.schemas`), sends them down
the same batching path (:mod:`serve.transport`), so a V2 request of 8 rows and a native single-row
request can share one forward pass, and encodes the answer in its own shape. Errors are typed
(:mod:`serve.errors`): the native protocol answers invalid content with 422, V1 and V2 with 400 as
KServe does.

The routes are served by :class:`ProtocolRouter` in front of FastAPI (they validate by themselves;
FastAPI's layers would only add cost) and document themselves in ``/openapi.json`` (:func:`add_route`).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route

import serve
from serve.errors import BadInput, InvalidInput, ModelNotFound, PayloadTooLarge, UnsupportedMediaType, response_for
from serve.schemas import (ErrorResponse, PredictManyResponse, PredictOneResponse, RowSchema, V1PredictResponse,
                           V2InferRequest, V2InferResponse, parse)
from serve.transport import Prediction, Transport

VERSION_HEADER = "X-Model-Version"
V2_SERVER_NAME = "simplenn-serve"
V2_INPUT, V2_OUTPUT = "input", "output"
_BINARY_HEADER = "inference-header-content-length"
_V2_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16,
             "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
             "UINT64": np.uint64}


@dataclass(frozen=True)
class ServingContext:
    """What every protocol needs: the model's name and row rules, the transport, and the server's state."""

    model_name: str
    schema: RowSchema
    transport: Transport
    max_body_bytes: int
    ready: Callable[[], bool]
    status: Callable[[], dict[str, Any]]

    def check_model(self, name: str, version: str | None = None) -> None:
        """404 for another model name, or for a version other than the live one."""
        if name != self.model_name:
            raise ModelNotFound(f"model {name!r} is not served here (serving {self.model_name!r})")
        if version is not None:
            live = self.status()["versions"]
            if version not in live:
                raise ModelNotFound(f"version {version!r} of {name!r} is not live (live: {live})")

    async def infer(self, values: np.ndarray, invalid: type[InvalidInput] = InvalidInput) -> Prediction:
        """Send rows down the shared batching path. Draining servers still answer (that is the drain).
        Rows the model cannot answer finitely are the client's (``invalid``: 422 native, 400 V1/V2)."""
        try:
            return await self.transport.infer(values)
        except InvalidInput as exc:
            raise invalid(exc.message) from None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def read_body(request: Request, limit: int, json_only: bool = True) -> bytes:
    """The request body, refusing a non-JSON Content-Type (415) and more than ``limit`` bytes (413), declared
    or streamed. Read from the ASGI messages themselves: Starlette's body stream costs more than the rest
    of reading a single-row request."""
    headers = request.headers
    content_type = headers.get("content-type")
    if json_only and content_type is not None and not _is_json(content_type):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {content_type!r}")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _column(outputs: np.ndarray) -> np.ndarray:
    """(rows, 1) -> (rows,) so single-output models answer plain numbers."""
    return outputs[:, 0] if outputs.shape[1] == 1 else outputs


_VERSION_HEADER_KEY = VERSION_HEADER.lower().encode()


class JsonResponse(Response):
    """A JSON body with its headers made directly (what Starlette's ``Response.__init__`` works out from
    arguments costs more here than the rest of building the answer); served by Starlette's ``__call__``."""

    media_type = "application/json"

    def __init__(self, body: bytes, status: int = 200, version: str | None = None) -> None:
        self.body, self.status_code, self.background = body, status, None
        self.raw_headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        if version:
            self.raw_headers.append((_VERSION_HEADER_KEY, version.encode("latin-1")))


def json_response(content: Any, version: str | None = None, status: int = 200) -> Response:
    """A JSON answer (numpy arrays serialized natively), with the model version header when given."""
    return JsonResponse(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, version)


class NativeProtocol:
    """``POST /predict``: ``{"input": row}`` -> ``{"output": y}``; ``{"inputs": rows}`` -> ``{"outputs": ys}``."""

    path = "/predict"

    def __init__(self, context: ServingContext) -> None:
        self.context = context

    async def predict(self, request: Request) -> Response:
        rows = self.context.schema.decode_predict(await read_body(request, self.context.max_body_bytes))
        prediction = await self.context.infer(rows.values)
        outputs = _column(prediction.outputs)
        if rows.single:
            return json_response({"output": outputs[0], "model_version": prediction.version}, prediction.version)
        return json_response({"outputs": outputs, "model_version": prediction.version}, prediction.version)

    def register(self, app: FastAPI) -> None:
        add_route(app, self.path, self.predict, _operation(
            "predict", "Predict one or many rows", self.context.schema.predict_request, PredictOneResponse,
            PredictManyResponse, status_codes=(400, 413, 415, 422, 503, 504)))


class V1Protocol:
    """KServe V1 (TF Serving's REST shape): list, status and ``:predict`` with ``instances``."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context

    async def list_models(self, request: Request) -> Response:
        return json_response({"models": [self.context.model_name]})

    async def model_status(self, request: Request) -> Response:
        self.context.check_model(request.path_params["name"])
        status = self.context.status()
        return json_response(status, status=200 if status["ready"] else 503)

    async def predict(self, request: Request) -> Response:
        self.context.check_model(request.path_params["name"])
        rows = self.context.schema.decode_v1(await read_body(request, self.context.max_body_bytes))
        prediction = await self.context.infer(rows.values, BadInput)
        return json_response({"predictions": _column(prediction.outputs)}, prediction.version)

    def register(self, app: FastAPI) -> None:
        add_route(app, "/v1/models", self.list_models, _operation("kserve-v1", "List models"), "get")
        add_route(app, "/v1/models/{name}", self.model_status, _operation(
            "kserve-v1", "Model status: ready, live version, each worker's version and last reload",
            status_codes=(404, 503)), "get")
        add_route(app, "/v1/models/{name}:predict", self.predict, _operation(
            "kserve-v1", "Predict instances", self.context.schema.v1_request, V1PredictResponse,
            status_codes=(400, 404, 413, 415, 503, 504)))


class V2Protocol:
    """The Open Inference Protocol (V2) REST API, with the binary tensor data extension for inputs
    and outputs. The model takes one tensor ``input`` [-1, in_features] and returns ``output`` [-1, k].
    FP64, FP16 and integer inputs are converted to FP32; BOOL and BYTES are refused with 400. The body's rows:
    :func:`v2_request_rows`; the answer: :func:`v2_response`."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context

    async def server_metadata(self, request: Request) -> Response:
        return json_response({"name": V2_SERVER_NAME, "version": serve.__version__,
                              "extensions": ["binary_tensor_data"]})

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def server_ready(self, request: Request) -> Response:
        ready = self.context.ready()
        return json_response({"ready": ready}, status=200 if ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        self.context.check_model(request.path_params["name"], request.path_params.get("version"))
        return json_response(v2_model_metadata(self.context))

    async def model_ready(self, request: Request) -> Response:
        self.context.check_model(request.path_params["name"], request.path_params.get("version"))
        ready = self.context.ready()
        return json_response({"name": self.context.model_name, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: Request) -> Response:
        self.context.check_model(request.path_params["name"], request.path_params.get("version"))
        header_length = request.headers.get(_BINARY_HEADER)
        body = await read_body(request, self.context.max_body_bytes, json_only=header_length is None)
        json_part, binary = body, b""
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise BadInput(f"{_BINARY_HEADER} must be the JSON header's length in bytes")
            json_part, binary = body[: int(header_length)], body[int(header_length):]
        infer_request: V2InferRequest = parse(V2InferRequest, json_part, BadInput)
        values = v2_request_rows(self.context.schema, infer_request, binary)
        prediction = await self.context.infer(values, BadInput)
        return v2_response(self.context.model_name, infer_request, prediction)

    def register(self, app: FastAPI) -> None:
        add_route(app, "/v2", self.server_metadata, _operation("open-inference-v2", "Server metadata"), "get")
        add_route(app, "/v2/health/live", self.live, _operation("open-inference-v2", "Server live"), "get")
        add_route(app, "/v2/health/ready", self.server_ready, _operation(
            "open-inference-v2", "Server ready", status_codes=(503,)), "get")
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            add_route(app, prefix, self.model_metadata, _operation(
                "open-inference-v2", "Model metadata: inputs, outputs, live version", status_codes=(404,)), "get")
            add_route(app, prefix + "/ready", self.model_ready, _operation(
                "open-inference-v2", "Model ready", status_codes=(404, 503)), "get")
            add_route(app, prefix + "/infer", self.infer, _operation(
                "open-inference-v2", "Infer: one FP32 tensor 'input' [N, features] -> 'output' [N, 1]",
                V2InferRequest, V2InferResponse, status_codes=(400, 404, 413, 503, 504)))


def v2_request_rows(schema: RowSchema, infer_request: V2InferRequest, binary: bytes) -> np.ndarray:
    """The validated rows of a V2 REST infer request: its one tensor ``input``, from its JSON ``data`` or from
    the ``binary`` part after the JSON header (the binary data extension). ``BadInput`` names the problem."""
    check_v2_names([tensor.name for tensor in infer_request.inputs],
                   [output.name for output in infer_request.outputs or []])
    tensor = infer_request.inputs[0]
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if tensor.data is not None or not isinstance(binary_size, int) or binary_size != len(binary):
            raise BadInput("inputs[0]: binary_data_size must equal the binary part's length, with no 'data'")
        return v2_rows(schema, tensor.datatype, tensor.shape, raw=binary)
    if tensor.data is None:
        v2_dtype(tensor.datatype)  # an unsupported type is the first thing to say
        raise BadInput("inputs[0] needs 'data' (or the binary data extension)")
    return v2_rows(schema, tensor.datatype, tensor.shape, data=tensor.data)


def v2_response(model_name: str, infer_request: V2InferRequest, prediction: Prediction) -> Response:
    """The V2 REST answer to ``infer_request`` (its names already checked by :func:`v2_request_rows`): the FP32
    tensor ``output`` as JSON ``data``, or as little-endian bytes after the JSON header when the request asks
    for binary output (``binary_data`` of ``output``, else the request's ``binary_data_output``)."""
    outputs = prediction.outputs
    requested = {o.name: o for o in infer_request.outputs or []}
    wants_binary = bool(((requested.get(V2_OUTPUT) and requested[V2_OUTPUT].parameters) or {})
                        .get("binary_data", (infer_request.parameters or {}).get("binary_data_output", False)))
    tensor: dict[str, Any] = {"name": V2_OUTPUT, "datatype": "FP32", "shape": list(outputs.shape)}
    raw = b""
    if wants_binary:
        raw = np.ascontiguousarray(outputs, dtype="<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = outputs.reshape(-1)
    header = orjson.dumps({"model_name": model_name, "model_version": prediction.version,
                           "id": infer_request.id, "outputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not wants_binary:
        return Response(header, 200, {VERSION_HEADER: prediction.version}, media_type="application/json")
    return Response(header + raw, 200, {VERSION_HEADER: prediction.version, _BINARY_HEADER: str(len(header))},
                    media_type="application/octet-stream")


def v2_dtype(datatype: str) -> np.dtype:
    """The numpy type of a V2 ``datatype`` that converts to FP32; ``BadInput`` for BOOL, BYTES and unknowns."""
    dtype = _V2_TYPES.get(datatype)
    if dtype is None:
        raise BadInput(f"inputs[0].datatype {datatype!r} is not supported: use FP32 (FP64, FP16 and "
                       "integer types are converted)")
    return np.dtype(dtype)


def check_v2_names(inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """A V2 request (REST or gRPC) names exactly one input, ``input``, and asks for no output but ``output``."""
    if list(inputs) != [V2_INPUT]:
        raise BadInput(f"this model takes exactly one input named {V2_INPUT!r}, got {list(inputs)}")
    unknown = set(outputs) - {V2_OUTPUT}
    if unknown:
        raise BadInput(f"unknown requested outputs {sorted(unknown)}: this model has {V2_OUTPUT!r}")


def v2_rows(schema: RowSchema, datatype: str, shape: Sequence[int], raw: bytes | None = None,
            data: Any = None) -> np.ndarray:
    """The validated float32 rows of a V2 input tensor, REST or gRPC: from ``raw`` little-endian bytes (the
    binary data extension, ``raw_input_contents``) or typed ``data`` (JSON numbers, flat or nested, or a
    gRPC ``contents`` field). ``BadInput`` names the problem: type, shape, size, byte count, values."""
    dtype = v2_dtype(datatype)
    shape = list(shape)
    if len(shape) != 2 or min(shape) < 0:
        raise BadInput(f"inputs[0].shape must be [N, {schema.in_features}], got {shape}")
    count = math.prod(shape)  # Python ints: no overflow
    if count > schema.max_rows * schema.in_features:
        raise BadInput(f"inputs[0]: shape {shape} is larger than {schema.max_rows} rows of {schema.in_features}")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise BadInput(f"inputs[0]: {len(raw)} bytes do not hold shape {shape} of {datatype}")
        values = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    else:
        try:
            values = np.asarray(data, dtype=np.float64)
        except ValueError:  # ragged nested lists
            raise BadInput("inputs[0].data: nested rows must all have the same length") from None
        if values.size != count:
            raise BadInput(f"inputs[0]: shape {shape} needs {count} values, data has {values.size}")
        if dtype.kind in "iu" and not np.all(values == np.round(values)):
            raise BadInput(f"inputs[0]: {datatype} data must be whole numbers")
    return schema.check_array(values.reshape(shape), "inputs[0]", BadInput)


def v2_model_metadata(context: ServingContext) -> dict[str, Any]:
    """The V2 model metadata (REST and gRPC): live versions, one FP32 input [-1, features], output [-1, 1]."""
    return {"name": context.model_name, "versions": context.status()["versions"], "platform": "pytorch_libtorch",
            "inputs": [{"name": V2_INPUT, "datatype": "FP32", "shape": [-1, context.schema.in_features]}],
            "outputs": [{"name": V2_OUTPUT, "datatype": "FP32", "shape": [-1, 1]}]}


def register_protocols(app: FastAPI, context: ServingContext) -> "ProtocolRouter":
    """Create every protocol's routes; returns the router that serves them in front of ``app``."""
    for protocol in (NativeProtocol(context), V1Protocol(context), V2Protocol(context)):
        protocol.register(app)
    return ProtocolRouter(app.state.protocol_routes)


class ProtocolRouter:
    """ASGI app in front of FastAPI: protocol routes run here, everything else goes on to FastAPI.

    The prediction routes validate and answer by themselves, so they skip FastAPI's entry point and
    middleware stack (telemetry, error, body-limit, exception and exit-stack layers, then its router), which
    costs more per call than the rest of a single-row request in the HTTP server. Errors go through
    :func:`serve.errors.response_for`, the same mapping FastAPI's handlers use.
    """

    def __init__(self, routes: list[Route]) -> None:
        self.static = {(route.path, method): route for route in routes if "{" not in route.path
                       for method in route.methods or ()}
        self.dynamic = [route for route in routes if "{" in route.path]
        self.static_paths = {route.path for route in routes if "{" not in route.path}
        self.fallback: Any = None

    def wrap(self, fallback: Any) -> "ProtocolRouter":
        """A router with these routes in front of ``fallback`` (one per API server's app)."""
        router = copy.copy(self)
        router.fallback = fallback
        return router

    def match(self, scope: dict) -> Route | None:
        route = self.static.get((scope["path"], scope["method"]))
        if route is not None:
            return route
        for route in self.dynamic:
            found, child_scope = route.matches(scope)
            if found is Match.FULL:
                scope.update(child_scope)
                return route
        return None

    def wrong_method(self, scope: dict) -> bool:
        """The path is a protocol route's, the method is not."""
        return scope["path"] in self.static_paths or any(
            route.matches(scope)[0] is Match.PARTIAL for route in self.dynamic)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = self.match(scope) if scope["type"] == "http" else None
        if route is None:
            if scope["type"] == "http" and self.wrong_method(scope):
                response = response_for(StarletteHTTPException(405, f"{scope['method']} is not allowed here"))
                return await response(scope, receive, send)
            return await self.fallback(scope, receive, send)
        scope["app"], scope["route"] = self.fallback, route  # as FastAPI would set them
        try:
            response = await route.endpoint(Request(scope, receive))
        except Exception as exc:
            response = response_for(exc)
        await response(scope, receive, send)


def _operation(tag: str, summary: str, request: type[BaseModel] | None = None, *responses: type[BaseModel],
               status_codes: tuple[int, ...] = ()) -> dict[str, Any]:
    """An OpenAPI operation: JSON request body, success body (any of ``responses``) and error answers."""
    operation: dict[str, Any] = {"tags": [tag], "summary": summary, "responses": {
        "200": {"description": "Success", "headers": {VERSION_HEADER: {"schema": {"type": "string"}}}}}}
    if responses:
        schemas = [_inline(model) for model in responses]
        operation["responses"]["200"]["content"] = {"application/json": {
            "schema": schemas[0] if len(schemas) == 1 else {"anyOf": schemas}}}
    if request is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _inline(request)}}}
    for code in status_codes:
        operation["responses"][str(code)] = {"description": _STATUS_TEXT[code], "content": {
            "application/json": {"schema": _inline(ErrorResponse)}}}
    return operation


_STATUS_TEXT = {400: "Bad request", 404: "Unknown model or version", 413: "Body too large", 415: "Not JSON",
                422: "Invalid input", 503: "Not ready, draining or overloaded", 504: "Timed out"}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined, so it stands alone inside an operation."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    text = json.dumps(schema)
    for _ in range(4):  # nesting depth of our models
        for name, definition in defs.items():
            text = text.replace(json.dumps({"$ref": f"#/$defs/{name}"}), json.dumps(definition))
    return json.loads(text)


def add_route(app: FastAPI, path: str, endpoint: Callable[[Request], Awaitable[Response]],
              operation: dict[str, Any], method: str = "post") -> None:
    """Declare a protocol route (served by :class:`ProtocolRouter`) and add its OpenAPI ``operation``."""
    app.state.__dict__.setdefault("protocol_routes", []).append(Route(path, endpoint, methods=[method.upper()]))
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"{(\w+)}", path)]
    if parameters:
        operation = {**operation, "parameters": parameters}
    documented: dict = app.state.__dict__.setdefault("extra_openapi_paths", {})
    documented.setdefault(path, {})[method] = operation
    build = type(app).openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build(app)
            for extra_path, operations in documented.items():
                schema["paths"].setdefault(extra_path, {}).update(operations)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
