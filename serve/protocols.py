"""The HTTP prediction protocols. Each one decodes its body into the same validated rows
(:mod:`serve.schemas`), sends them through the same batching path (:mod:`serve.transport`) and encodes
the answer. Today: the native ``POST /predict``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve.errors import PayloadTooLarge, UnsupportedMediaType
from serve.schemas import ErrorResponse, PredictManyResponse, PredictOneResponse, RowSchema
from serve.transport import Prediction, Transport

VERSION_HEADER = "X-Model-Version"


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def read_json_body(request: Request, limit: int) -> bytes:
    """The request body, refusing a non-JSON Content-Type (415) and more than ``limit`` bytes (413)."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {content_type!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
        return await request.body()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _column(outputs: np.ndarray) -> np.ndarray:
    """(rows, 1) -> (rows,) so single-output models answer plain numbers."""
    return outputs[:, 0] if outputs.shape[1] == 1 else outputs


def json_response(content: Any, version: str) -> Response:
    """A JSON answer (numpy arrays serialized natively) carrying the model version header."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), 200,
                    {VERSION_HEADER: version}, media_type="application/json")


class NativeProtocol:
    """``POST /predict``: ``{"input": row}`` -> ``{"output": y}``; ``{"inputs": rows}`` -> ``{"outputs": ys}``."""

    path = "/predict"

    def __init__(self, schema: RowSchema, transport: Transport, max_body_bytes: int) -> None:
        self.schema = schema
        self.transport = transport
        self.max_body_bytes = max_body_bytes

    async def predict(self, request: Request) -> Response:
        rows = self.schema.decode_predict(await read_json_body(request, self.max_body_bytes))
        prediction: Prediction = await self.transport.infer(rows.values)
        outputs = _column(prediction.outputs)
        if rows.single:
            return json_response({"output": outputs[0], "model_version": prediction.version}, prediction.version)
        return json_response({"outputs": outputs, "model_version": prediction.version}, prediction.version)

    def register(self, app: FastAPI) -> None:
        """Mount the route (a plain Starlette route: no per-request dependency solving) and document it."""
        add_route(app, self.path, self.predict, {
            "tags": ["predict"], "summary": "Predict one or many rows",
            "requestBody": _json_body(self.schema.predict_request.model_json_schema()),
            "responses": {"200": {"description": "One output per input row, in order.",
                                  "headers": {VERSION_HEADER: {"schema": {"type": "string"},
                                                               "description": "Version that answered."}},
                                  "content": {"application/json": {"schema": {"anyOf": [
                                      PredictOneResponse.model_json_schema(),
                                      PredictManyResponse.model_json_schema()]}}}},
                          **_ERROR_RESPONSES},
        })


def _json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_ERROR_RESPONSES = {str(code): {"description": text, "content": {"application/json": {
    "schema": ErrorResponse.model_json_schema()}}} for code, text in (
    (400, "Malformed request"), (413, "Body too large"), (415, "Not JSON"), (422, "Invalid input"),
    (503, "Not ready or overloaded"), (504, "Timed out"))}


def add_route(app: FastAPI, path: str, endpoint, operation: dict, method: str = "post") -> None:
    """Mount a hot-path route as a plain Starlette ``Route`` and add its OpenAPI ``operation``.

    FastAPI's ``APIRoute`` solves dependencies and re-validates on every call; the protocol routes
    validate with :mod:`serve.schemas` themselves, so they skip that and document themselves here.
    """
    app.router.routes.append(Route(path, endpoint, methods=[method.upper()]))
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
