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

from serve.errors import PayloadTooLarge, UnsupportedMediaType
from serve.schemas import ErrorResponse, PredictManyResponse, PredictOneResponse, RowSchema
from serve.transport import Prediction, Transport

VERSION_HEADER = "X-Model-Version"
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503, 504)}


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
        """Add the route, with its request and response schemas for ``/openapi.json``."""
        app.add_api_route(
            self.path, self.predict, methods=["POST"], tags=["predict"], summary="Predict one or many rows",
            response_model=PredictOneResponse | PredictManyResponse,
            responses={**_ERRORS, 200: {"headers": {VERSION_HEADER: {"schema": {"type": "string"},
                                                                      "description": "Version that answered."}}}},
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                "schema": self.schema.predict_request.model_json_schema()}}}},
        )
