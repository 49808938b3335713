"""The baseline: the plain way to serve SimpleNN, FastAPI + pydantic, one uvicorn process.

It loads the same weights file as the project server (``BENCH_WEIGHTS``, default
``weights/model.pth``) and runs the model in-process, once per request, under
``torch.inference_mode()``; no batching across requests, no worker processes. The endpoint is an
``async def``, so the tiny forward pass runs on the event loop without a thread-pool hop (the
faster of FastAPI's two plain options, so the project is compared against a fair baseline).
torch runs with ``BENCH_TORCH_THREADS`` intra-op threads (default 1, as the project's workers do):
with torch's default of one thread per core, idle OpenMP threads spin on a 2-core machine that
wrk shares, and 64-row requests cost 10x more CPU.

Same wire format as the project server:
``{"input": [10 numbers]}`` -> ``{"output": x, "model_version": id}`` and
``{"inputs": [[10 numbers], ...]}`` -> ``{"outputs": [x, ...], "model_version": id}``.

Run: ``BENCH_WEIGHTS=weights/model.pth uvicorn bench.apps.baseline_app:app``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field, model_validator

from bench.model import IN_FEATURES, load_model
from serve.versions import file_version

Row = Annotated[list[float], Field(min_length=IN_FEATURES, max_length=IN_FEATURES)]


class PredictRequest(BaseModel):
    """Exactly one of ``input`` (one row) or ``inputs`` (one or more rows)."""

    input: Row | None = None
    inputs: Annotated[list[Row], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictRequest:
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of 'input' or 'inputs'")
        return self


class SingleResponse(BaseModel):
    output: float
    model_version: str


class BatchResponse(BaseModel):
    outputs: list[float]
    model_version: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model once at startup."""
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
    weights = Path(os.environ.get("BENCH_WEIGHTS", "weights/model.pth"))
    app.state.model = load_model(weights)
    app.state.version = file_version(weights)
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/health/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/predict")
async def predict(body: PredictRequest, request: Request) -> SingleResponse | BatchResponse:
    """Run SimpleNN on the request's row(s)."""
    rows = [body.input] if body.input is not None else body.inputs
    with torch.inference_mode():
        outputs = request.app.state.model(torch.tensor(rows, dtype=torch.float32))
    values: list[float] = outputs.reshape(-1).tolist()
    version: str = request.app.state.version
    if body.input is not None:
        return SingleResponse(output=values[0], model_version=version)
    return BatchResponse(outputs=values, model_version=version)
