"""Typed errors and the one place that maps them to HTTP status codes and ``{"error": ...}`` bodies.

Request errors are raised in the API server (validation, limits, routing) or come back from an
inference worker; weights errors stop startup or reject a hot reload. Every HTTP answer that is not a
success is built by :func:`error_response`, so the body shape and the status codes live here only.
Each error also names its gRPC status code (``grpc_code``, a ``grpc.StatusCode`` name), which
:mod:`serve.grpc_protocol` answers with: the one mapping for both protocols.
"""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of every error the server answers with; ``status_code`` is the HTTP status, ``grpc_code`` the
    gRPC one. A client's mistake is never 500 nor INTERNAL."""

    status_code = 500
    grpc_code = "INTERNAL"
    headers: dict[str, str] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServeError):
    """The body parsed but its content is wrong: keys, row length, types, non-finite numbers, row count."""

    status_code = 422
    grpc_code = "INVALID_ARGUMENT"


class BadInput(InvalidInput):
    """Invalid input for the KServe V1 and Open Inference (V2) protocols, which answer 400."""

    status_code = 400


class MalformedRequest(ServeError):
    """The body is not JSON (or not the gRPC message), or the request is otherwise unusable as sent."""

    status_code = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(ServeError):
    """The body is larger than ``SIMPLENN_MAX_BODY_BYTES``."""

    status_code = 413
    grpc_code = "RESOURCE_EXHAUSTED"  # what gRPC itself answers past its max receive message length


class UnsupportedMediaType(ServeError):
    """The request's Content-Type is not ``application/json``."""

    status_code = 415
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(ServeError):
    """A management route was called without the right bearer token."""

    status_code = 401
    grpc_code = "UNAUTHENTICATED"
    headers = {"WWW-Authenticate": "Bearer"}


class ModelNotFound(ServeError):
    """The request names a model or version this server does not serve."""

    status_code = 404
    grpc_code = "NOT_FOUND"


class NotReady(ServeError):
    """The server is starting or draining and takes no new work."""

    status_code = 503
    grpc_code = "UNAVAILABLE"
    headers = {"Retry-After": "1"}


class NotLive(ServeError):
    """The server has made no progress for too long; the orchestrator should restart it."""

    status_code = 503
    grpc_code = "UNAVAILABLE"


class Overloaded(ServeError):
    """The request queue is full; the client should retry later."""

    status_code = 503
    grpc_code = "RESOURCE_EXHAUSTED"
    headers = {"Retry-After": "1"}


class WorkerLost(ServeError):
    """The inference worker holding the request died; it is being replaced. Safe to retry."""

    status_code = 503
    grpc_code = "UNAVAILABLE"
    headers = {"Retry-After": "1"}


class RequestTimeout(ServeError):
    """No inference worker answered within ``SIMPLENN_REQUEST_TIMEOUT_S``."""

    status_code = 504
    grpc_code = "DEADLINE_EXCEEDED"


class InferenceError(ServeError):
    """The model failed on a batch (a server-side fault, never the client's)."""

    status_code = 500


class WeightsError(ServeError):
    """A weights file cannot be served: stops startup, or keeps the old model during a reload.

    ``reason`` is a short machine-friendly label used in metrics and status (``not_found``,
    ``unreadable``, ``not_state_dict``, ``mismatch``, ``not_finite``, ``digest``, ``compile``, ``golden``).
    """

    reason = "invalid"

    def __init__(self, path: object, detail: str, reason: str | None = None) -> None:
        super().__init__(f"weights {path}: {detail}")
        self.path = path
        if reason:
            self.reason = reason


def error_body(message: str) -> bytes:
    """The JSON body of every error answer."""
    return orjson.dumps({"error": message})


def error_response(exc: ServeError) -> Response:
    """Turn a typed error into its HTTP answer."""
    return Response(error_body(exc.message), exc.status_code, exc.headers or None, media_type="application/json")


def response_for(exc: Exception) -> Response:
    """The one mapping from any exception to its HTTP answer."""
    if isinstance(exc, ServeError):
        if exc.status_code >= 500:
            logger.warning("answering %d: %s", exc.status_code, exc.message)
        return error_response(exc)
    if isinstance(exc, StarletteHTTPException):  # routing's 404/405, in our body shape
        error = ServeError(str(exc.detail))
        error.status_code = exc.status_code
        error.headers = dict(exc.headers or {})
        return error_response(error)
    if isinstance(exc, ClientDisconnect):  # nobody reads this answer; not a server error
        logger.debug("client disconnected before the request was read")
        return Response(status_code=499)
    logger.error("unexpected error", exc_info=exc)
    return error_response(InferenceError("internal server error"))


async def _handler(_: Request, exc: Exception) -> Response:
    return response_for(exc)


def install_error_handlers(app) -> None:
    """Register :func:`response_for` on a Starlette/FastAPI app for every exception type."""
    for exc_type in (ServeError, StarletteHTTPException, ClientDisconnect, Exception):
        app.add_exception_handler(exc_type, _handler)


class WeightsNotFoundError(WeightsError):
    """No servable weights at the configured location (the message names the location and why)."""

    reason = "not_found"

    def __init__(self, message: str) -> None:
        ServeError.__init__(self, message)
        self.path = None
