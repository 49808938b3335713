"""Request and response shapes, and the validation rules for input rows (they live here once).

A row is a list of exactly ``in_features`` finite JSON numbers (booleans, strings, ``null``, ``NaN`` and
``Infinity`` are refused). Validation runs in the API server, before anything is queued, so one
client's bad row can never fail another client's request in the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from serve.errors import BadInput, InvalidInput, MalformedRequest

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]


@dataclass(frozen=True)
class Rows:
    """Validated input rows ready for the model: ``values`` is float32 of shape (n, in_features)."""

    values: np.ndarray
    single: bool


class PredictOneResponse(BaseModel):
    """Answer to ``{"input": [...]}``."""

    output: float | list[float]
    model_version: str


class PredictManyResponse(BaseModel):
    """Answer to ``{"inputs": [[...], ...]}``: one output per input row, in order."""

    outputs: list[float] | list[list[float]]
    model_version: str


class V1PredictResponse(BaseModel):
    """KServe V1 answer: one prediction per instance, in order."""

    predictions: list[float] | list[list[float]]


class V2Tensor(BaseModel):
    """An Open Inference Protocol tensor: ``data`` flat or nested, or raw bytes (binary data extension)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[FiniteNumber] | list[list[FiniteNumber]] | None = None


class V2RequestedOutput(BaseModel):
    """An output the client asks for (``parameters.binary_data`` asks for raw bytes)."""

    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """Open Inference Protocol ``/infer`` request body."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: Annotated[list[V2Tensor], Field(min_length=1)]
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(BaseModel):
    """An output tensor in a V2 answer."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class V2InferResponse(BaseModel):
    """Open Inference Protocol ``/infer`` answer."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


class ErrorResponse(BaseModel):
    """Body of every error answer."""

    error: str


def _exactly_one(model: BaseModel) -> BaseModel:
    if (model.input is None) == (model.inputs is None):  # type: ignore[attr-defined]
        raise ValueError("the body needs exactly one of 'input' (one row) or 'inputs' (a list of rows)")
    return model


def _location(loc: tuple[Any, ...]) -> str:
    """('inputs', 3, 2) -> 'inputs[3][2]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line for the first few problems pydantic found, each with where it is."""
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = _location(tuple(err["loc"]))
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class RowSchema:
    """The validation rules for one model's rows: ``in_features`` numbers each, at most ``max_rows`` rows."""

    def __init__(self, in_features: int, max_rows: int) -> None:
        self.in_features = in_features
        self.max_rows = max_rows
        self.row_type = Annotated[list[FiniteNumber], Field(min_length=in_features, max_length=in_features)]
        self.rows_type = Annotated[list[self.row_type], Field(min_length=1, max_length=max_rows)]  # type: ignore[name-defined]
        self.v1_request = create_model(
            "V1PredictRequest",
            __config__=ConfigDict(extra="forbid"),
            instances=(self.rows_type, Field(description=f"1 to {max_rows} rows of {in_features} numbers.")),
        )
        self.predict_request = create_model(
            "PredictRequest",
            __config__=ConfigDict(extra="forbid"),
            __validators__={"exactly_one": model_validator(mode="after")(_exactly_one)},
            input=(self.row_type | None, Field(None, description=f"One row of {in_features} numbers.")),
            inputs=(self.rows_type | None, Field(None, description=f"1 to {max_rows} rows of {in_features} numbers.")),
        )

    def decode_predict(self, body: bytes) -> Rows:
        """Validate a native ``/predict`` body into rows; raises ``MalformedRequest`` or ``InvalidInput``."""
        request = parse(self.predict_request, body, InvalidInput)
        if request.input is not None:
            return Rows(self.to_array([request.input], "input", InvalidInput), single=True)
        return Rows(self.to_array(request.inputs, "inputs", InvalidInput), single=False)

    def decode_v1(self, body: bytes) -> Rows:
        """Validate a KServe V1 ``{"instances": [...]}`` body; invalid content is 400 (``BadInput``)."""
        return Rows(self.to_array(parse(self.v1_request, body, BadInput).instances, "instances", BadInput),
                    single=False)

    def to_array(self, rows: list[list[float]], name: str, error: type[InvalidInput]) -> np.ndarray:
        """Validated rows -> float32 (n, in_features); ``fromiter`` is ~2x faster than ``np.array`` here."""
        flat = np.fromiter(chain.from_iterable(rows), dtype=np.float64, count=len(rows) * self.in_features)
        return self._as_float32(flat.reshape(len(rows), self.in_features), name, error)

    @staticmethod
    def _as_float32(values: np.ndarray, name: str, error: type[InvalidInput]) -> np.ndarray:
        """float32 rows; a number that is finite in JSON but beyond float32's range (|x| > 3.4e38) is refused."""
        with np.errstate(over="ignore", invalid="ignore"):
            converted = np.ascontiguousarray(values, dtype=np.float32)
        if not np.isfinite(converted).all():
            raise error(f"{name}: values must be finite numbers within float32's range (|x| < 3.4e38)")
        return converted

    def check_array(self, values: np.ndarray, name: str, error: type[InvalidInput] = InvalidInput) -> np.ndarray:
        """Apply the same rules to an already-decoded 2-D array (tensor protocols); returns float32."""
        if values.ndim != 2 or values.shape[1] != self.in_features:
            raise error(f"{name}: expected shape [N, {self.in_features}], got {list(values.shape)}")
        if not 1 <= values.shape[0] <= self.max_rows:
            raise error(f"{name}: expected 1 to {self.max_rows} rows, got {values.shape[0]}")
        return self._as_float32(values, name, error)


def parse(model: type[BaseModel], body: bytes, error: type[InvalidInput] = InvalidInput) -> Any:
    """Validate JSON ``body`` against ``model``: syntax errors are 400 ``MalformedRequest``, content errors
    raise ``error`` (422 for the native protocol, 400 for V1/V2) with a message naming where."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        invalid_json = [err["msg"] for err in exc.errors() if err["type"] == "json_invalid"]
        if invalid_json:
            raise MalformedRequest(f"malformed JSON: {invalid_json[0]}") from None
        raise error(describe_validation_error(exc)) from None
