"""Request and response shapes, and the validation rules for input rows (they live here once).

A row is a list of exactly ``in_features`` finite JSON numbers (booleans, strings, ``null``, ``NaN`` and
``Infinity`` are refused). Validation runs in the API server, before anything is queued, so one
client's bad row can never fail another client's request in the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from serve.errors import InvalidInput, MalformedRequest

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
        self.predict_request = create_model(
            "PredictRequest",
            __config__=ConfigDict(extra="forbid"),
            __validators__={"exactly_one": model_validator(mode="after")(_exactly_one)},
            input=(self.row_type | None, Field(None, description=f"One row of {in_features} numbers.")),
            inputs=(self.rows_type | None, Field(None, description=f"1 to {max_rows} rows of {in_features} numbers.")),
        )

    def decode_predict(self, body: bytes) -> Rows:
        """Validate a native ``/predict`` body into rows; raises ``MalformedRequest`` or ``InvalidInput``."""
        try:
            request = self.predict_request.model_validate_json(body)
        except ValidationError as exc:
            raise _as_input_error(exc) from None
        if request.input is not None:
            return Rows(np.array([request.input], dtype=np.float32), single=True)
        return Rows(np.array(request.inputs, dtype=np.float32), single=False)

    def check_array(self, values: np.ndarray, name: str) -> np.ndarray:
        """Apply the same rules to an already-decoded 2-D array (tensor protocols); returns float32."""
        if values.ndim != 2 or values.shape[1] != self.in_features:
            raise InvalidInput(f"{name}: expected shape [N, {self.in_features}], got {list(values.shape)}")
        if not 1 <= values.shape[0] <= self.max_rows:
            raise InvalidInput(f"{name}: expected 1 to {self.max_rows} rows, got {values.shape[0]}")
        values = values.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise InvalidInput(f"{name}: values must be finite numbers (no NaN or Infinity)")
        return values


def _as_input_error(exc: ValidationError) -> Exception:
    """JSON syntax errors are 400 (malformed); everything else is 422 (valid JSON, wrong content)."""
    if any(err["type"] == "json_invalid" for err in exc.errors()):
        detail = next(err["msg"] for err in exc.errors() if err["type"] == "json_invalid")
        return MalformedRequest(f"malformed JSON: {detail}")
    return InvalidInput(describe_validation_error(exc))
