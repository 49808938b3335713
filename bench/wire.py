"""How each benchmarked server is asked for predictions: a request of N rows in one protocol (path, body,
headers) and how the outputs are read back from its answer.

The rows are :func:`bench.loadgen.make_rows` for a row count and seed, so every protocol carries the
same numbers and every server's outputs can be compared with the baseline's. Wires:

* ``native``     - the project's ``POST /predict``: ``{"input": row}`` or ``{"inputs": rows}``, answered
  with ``output``/``outputs`` and ``model_version``;
* ``torchserve`` - ``POST /predictions/simplenn`` with the native body (bench/apps/torchserve_handler.py
  reads it), answered ``{"output": y}`` / ``{"outputs": ys}``;
* ``kserve-v1``  - KServe V1, ``POST /v1/models/simplenn:predict`` with ``{"instances": rows}``, answered
  ``{"predictions": ys}``;
* ``v2-binary``  - the Open Inference Protocol V2 with the binary tensor data extension, as tritonclient
  sends it by default: a JSON header naming the FP32 tensor ``input`` [N, 10] with ``binary_data_size``
  and asking for binary outputs, its length in ``Inference-Header-Content-Length``, then the rows as raw
  little-endian FP32 bytes; the answer is a JSON header followed by the outputs as raw FP32.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import make_rows

MODEL_NAME = "simplenn"
BINARY_HEADER = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"

Rows = list[list[float]]


class WireError(ValueError):
    """An answer that does not have the shape its protocol promises."""


@dataclass(frozen=True)
class Request:
    """One HTTP POST: path, body and headers (Content-Type included)."""

    path: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class PreparedRequest:
    """A :class:`Request` whose body lies in a file, for wrk."""

    path: str
    body_file: Path
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Wire:
    """One protocol: where to POST, how to encode rows (body and its headers), how to decode outputs."""

    name: str
    path: str
    encode: Callable[[Rows], tuple[bytes, dict[str, str]]]
    decode: Callable[[bytes, int], list[float]]

    def request(self, rows: int, seed: int) -> Request:
        """The request for ``rows`` rows of :func:`make_rows` with ``seed``."""
        body, headers = self.encode(make_rows(rows, seed))
        return Request(self.path, body, headers)

    def prepare(self, folder: Path, rows: int, seed: int) -> PreparedRequest:
        """:meth:`request`, its body written to ``folder`` (one file per wire and row count)."""
        request = self.request(rows, seed)
        body_file = folder / f"{self.name}_{rows}.body"
        body_file.write_bytes(request.body)
        return PreparedRequest(request.path, body_file, request.headers)


def _json(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _parse(body: bytes) -> dict[str, object]:
    try:
        reply = json.loads(body)
    except ValueError as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise WireError("the answer is not a JSON object")
    return reply


def _floats(values: object, rows: int) -> list[float]:
    """``values`` as ``rows`` floats, or WireError."""
    if not isinstance(values, list) or len(values) != rows:
        raise WireError(f"expected {rows} output(s), got {str(values)[:80]}")
    try:
        return [float(v[0] if isinstance(v, list) and len(v) == 1 else v) for v in values]
    except (TypeError, ValueError) as exc:
        raise WireError(f"outputs are not numbers: {exc}") from None


def encode_native(rows: Rows) -> tuple[bytes, dict[str, str]]:
    """``{"input": row}`` for one row, ``{"inputs": rows}`` for more."""
    payload = {"input": rows[0]} if len(rows) == 1 else {"inputs": rows}
    return _json(payload), {"Content-Type": JSON_TYPE}


def native_decoder(versioned: bool) -> Callable[[bytes, int], list[float]]:
    """The decoder of ``{"output": y}`` / ``{"outputs": ys}``, which must carry a string ``model_version``
    when ``versioned``."""

    def decode(body: bytes, rows: int) -> list[float]:
        reply = _parse(body)
        if versioned and not isinstance(reply.get("model_version"), str):
            raise WireError("no model_version in the answer")
        return _floats([reply.get("output")] if rows == 1 else reply.get("outputs"), rows)

    return decode


def encode_kserve_v1(rows: Rows) -> tuple[bytes, dict[str, str]]:
    """``{"instances": rows}`` (one row is a list of one instance)."""
    return _json({"instances": rows}), {"Content-Type": JSON_TYPE}


def decode_kserve_v1(body: bytes, rows: int) -> list[float]:
    return _floats(_parse(body).get("predictions"), rows)


def encode_v2_binary(rows: Rows) -> tuple[bytes, dict[str, str]]:
    """tritonclient's default form: JSON header, then the rows as little-endian FP32."""
    raw = struct.pack(f"<{len(rows) * len(rows[0])}f", *(x for row in rows for x in row))
    header = _json({
        "inputs": [{"name": "input", "shape": [len(rows), len(rows[0])], "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    })
    return header + raw, {"Content-Type": "application/octet-stream", BINARY_HEADER: str(len(header))}


def decode_v2_binary(body: bytes, rows: int) -> list[float]:
    """The outputs of a binary V2 answer: the JSON header's one output of ``rows`` FP32 values, which are
    the last ``4 * rows`` bytes."""
    size = 4 * rows
    if len(body) < size:
        raise WireError(f"answer of {len(body)} bytes is shorter than {rows} FP32 outputs")
    reply = _parse(body[: len(body) - size])
    outputs = reply.get("outputs")
    if not (isinstance(outputs, list) and outputs and isinstance(outputs[0], dict)):
        raise WireError("no outputs in the JSON header")
    declared = (outputs[0].get("parameters") or {}).get("binary_data_size")
    if declared != size:
        raise WireError(f"binary_data_size {declared}, expected {size}")
    return list(struct.unpack(f"<{rows}f", body[len(body) - size:]))


NATIVE = Wire("native", "/predict", encode_native, native_decoder(versioned=True))
TORCHSERVE = Wire("torchserve", f"/predictions/{MODEL_NAME}", encode_native, native_decoder(versioned=False))
KSERVE_V1 = Wire("kserve-v1", f"/v1/models/{MODEL_NAME}:predict", encode_kserve_v1, decode_kserve_v1)
V2_BINARY = Wire("v2-binary", f"/v2/models/{MODEL_NAME}/infer", encode_v2_binary, decode_v2_binary)
