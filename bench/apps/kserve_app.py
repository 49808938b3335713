"""KServe's ModelServer serving SimpleNN, the benchmark's KServe peer (bench/peers.py starts it).

It runs in the kserve virtual environment (not the project's), as KServe's custom-model guide has it: a
``kserve.Model`` whose ``load`` reads the same weights file (``BENCH_WEIGHTS``) into SimpleNN and whose
``predict`` runs it under ``torch.inference_mode()``, in one ModelServer process (one uvicorn worker).
``predict`` is ``async def``, so the tiny forward pass runs on the event loop, as in the baseline.
torch uses ``BENCH_TORCH_THREADS`` intra-op threads (default 1, as the project's workers do).

The event loop is uvloop (with httptools for HTTP), as ModelServer's ``--event-loop auto`` means to have
it: with one worker, KServe 0.21 runs uvicorn inside its own ``asyncio.run``, which would otherwise keep
asyncio's default loop whatever that option says.

Protocols, both KServe's own code:

* V1: ``POST /v1/models/simplenn:predict`` with ``{"instances": [[10 numbers], ...]}`` ->
  ``{"predictions": [y, ...]}``;
* the Open Inference Protocol V2, ``POST /v2/models/simplenn/infer``, with the binary tensor extension:
  the tensor ``input`` [N, 10] FP32 -> ``output`` [N, 1] FP32 (binary when the request asks for it).

Logging: warnings only, no access log and no per-request latency line (``--enable_latency_logging
false``); ModelServer's own arguments come from the command line:

    python -m bench.apps.kserve_app --http_port 8080 --grpc_port 8081 --enable_grpc false \\
        --workers 1 --enable_latency_logging false --configure_logging false
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import kserve
import torch
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from bench.model import load_model

MODEL_NAME = "simplenn"


class SimpleNNModel(kserve.Model):
    """SimpleNN behind KServe's V1 and V2 data planes."""

    def __init__(self, name: str, weights: Path) -> None:
        super().__init__(name)
        self.weights = weights
        self.model: torch.nn.Module | None = None

    def load(self) -> bool:
        self.model = load_model(self.weights)
        self.ready = True
        return self.ready

    async def predict(self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None,
                      ) -> dict[str, Any] | InferResponse:
        """V1 ``instances`` -> ``predictions``; a V2 request -> a V2 response with the tensor ``output``."""
        assert self.model is not None, "load() first"
        if isinstance(payload, InferRequest):
            rows = torch.from_numpy(payload.inputs[0].as_numpy()).to(torch.float32)
        else:
            rows = torch.tensor(payload["instances"], dtype=torch.float32)
        with torch.inference_mode():
            outputs = self.model(rows)
        if not isinstance(payload, InferRequest):
            return {"predictions": outputs.reshape(-1).tolist()}
        output = InferOutput(name="output", shape=list(outputs.shape), datatype="FP32")
        output.set_data_from_numpy(outputs.numpy(), binary_data=payload.use_binary_outputs)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output],
                             use_binary_outputs=payload.use_binary_outputs)


def quiet_logging() -> None:
    """Warnings only: no uvicorn access log, no KServe per-request trace lines."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "kserve", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)


def use_uvloop() -> None:
    """Make ``asyncio.run`` use uvloop when it is installed (KServe's dependencies bring it), and set a
    current loop for ModelServer's ``asyncio.get_event_loop()`` before it (uvloop's policy makes none)."""
    if importlib.util.find_spec("uvloop"):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.set_event_loop(asyncio.new_event_loop())


def main() -> None:
    quiet_logging()
    use_uvloop()
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
    model = SimpleNNModel(MODEL_NAME, Path(os.environ.get("BENCH_WEIGHTS", "weights/model.pth")))
    model.load()
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
