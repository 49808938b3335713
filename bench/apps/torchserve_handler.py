"""TorchServe handler for SimpleNN, the benchmark's TorchServe peer (bench/peers.py archives it).

It runs inside TorchServe's Python backend worker (the torchserve virtual environment, not the
project's), on the stock ``BaseHandler``: BaseHandler loads ``models/simple_nn.py``'s SimpleNN and the
archived state_dict (``torch.load``, weights only), and times each batch as TorchServe's metrics expect.
This handler only adds the wire format, the project's native JSON:

* ``{"input": [10 numbers]}``        -> ``{"output": y}``
* ``{"inputs": [[10 numbers], ...]}`` -> ``{"outputs": [y, ...]}``

TorchServe batches requests (``batchSize``/``maxBatchDelay`` in the model's config): ``preprocess``
concatenates every request's rows into one tensor, one forward pass runs, and ``postprocess`` hands each
request its own slice. torch uses one intra-op thread, as the project's workers do.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler


def _rows(request: dict[str, Any]) -> tuple[list[list[float]], bool]:
    """One request's rows, and whether it used the single-row form."""
    payload = request.get("body", request.get("data"))
    if isinstance(payload, (bytes, bytearray)):
        payload = json.loads(payload)
    if not isinstance(payload, dict):
        raise ValueError('expected {"input": row} or {"inputs": rows}')
    if "input" in payload:
        return [payload["input"]], True
    return payload["inputs"], False


class SimpleNNHandler(BaseHandler):
    """BaseHandler with the native wire format and request batching."""

    def initialize(self, context: Any) -> None:
        torch.set_num_threads(1)
        super().initialize(context)
        self.shapes: list[tuple[int, bool]] = []

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        rows: list[list[float]] = []
        self.shapes = []
        for request in data:
            request_rows, single = _rows(request)
            rows += request_rows
            self.shapes.append((len(request_rows), single))
        return torch.tensor(rows, dtype=torch.float32)

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        values: list[float] = data.reshape(-1).tolist()
        answers: list[dict[str, Any]] = []
        start = 0
        for count, single in self.shapes:
            part = values[start:start + count]
            answers.append({"output": part[0]} if single else {"outputs": part})
            start += count
        return answers
