"""Logging: one JSON object per line, in every process.

Each record has ``ts``, ``level``, ``logger``, ``msg`` and, when set, ``request_id``, ``pid`` and
extra fields (``method``, ``path``, ``status``, ``ms`` for access lines).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time

import orjson

_EXTRA_FIELDS = ("request_id", "method", "path", "status", "ms", "client")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
            "msg": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


_access_logger = logging.getLogger("simplenn.access")


def log_access(request_id: str, method: str, path: str, status: int | str, seconds: float) -> None:
    """One access line for an answered request (HTTP, or gRPC with method ``GRPC`` and the status name)."""
    _access_logger.info("request", extra={"request_id": request_id, "method": method, "path": path,
                                          "status": status, "ms": round(seconds * 1000, 3)})


def new_request_id() -> str:
    """A fresh request id: 96 random bits as 24 hex digits.

    From the ``random`` module, which Python reseeds from the OS in every forked or spawned process, not
    from ``os.urandom``: an id must be unique, not secret, and this costs no system call per request."""
    return f"{random.getrandbits(96):024x}"


def configure_logging(level: str) -> None:
    """Send every logger (ours, uvicorn's, LitServe's) through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become JSON lines too
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litserve", "py.warnings"):
        child = logging.getLogger(name)
        child.handlers[:] = []
        child.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access log carries the request id
