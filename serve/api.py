"""The LitAPI: what each inference worker does with a batch of validated rows.

``setup`` (in the spawned worker, never at import) imports torch and the model class, resolves the
device, connects to the supervisor's control channel, tells it the model's input width, and serves
the version the manager names (:mod:`serve.registry`); a thread then carries out the manager's later
commands. This module imports no torch at import time: the supervisor and the API servers, which
only pickle this object, never load torch. ``batch`` stacks the rows of many requests, ``predict``
runs one forward pass on one registry snapshot and returns the outputs with the version that
computed them, ``unbatch`` splits them back per request. The worker's loop is
:class:`serve.worker.BatchingLoop`.
"""

from __future__ import annotations

import logging
import os
import threading

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import litserve as ls
import numpy as np
from litserve.specs.base import LitSpec

from serve.control import ControlClient
from serve.logs import configure_logging
from serve.process import detach_worker, freeze_heap, release_startup_pages
from serve.settings import Settings
from serve.transport import Layout
from serve.worker import BatchingLoop

if TYPE_CHECKING:
    import torch

    from serve.registry import ModelRegistry

logger = logging.getLogger(__name__)


class ServingAPI(ls.LitAPI):
    """SimpleNN (or any ``nn.Module`` named by ``SIMPLENN_MODEL_CLASS``) behind LitServe."""

    def __init__(self, settings: Settings, layout: Layout, spec: LitSpec) -> None:
        super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout_ms / 1000,
                         loop=BatchingLoop(), spec=spec)
        self.settings = settings
        self.layout = layout
        self.registry: ModelRegistry | None = None
        self.torch: Any = None

    def setup(self, device: str) -> None:
        """Serve the version the supervisor names on this worker's device, then follow its commands."""
        detach_worker()  # the supervisor coordinates shutdown
        configure_logging(self.settings.log_level)
        import torch

        from serve.loader import LoadOptions, import_model_class, input_features, resolve_device
        from serve.registry import ModelRegistry, follow_commands

        self.torch = torch
        worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        client = ControlClient(self.layout.control, "worker", worker_id)
        try:
            in_features = input_features(import_model_class(self.settings.model_class))
            target = resolve_device(self.settings.device, assigned=device)
        except ValueError as exc:  # nothing this worker could serve: the server does not start
            client.send({"t": "rejected", "version": None, "error": str(exc), "reason": "setup"})
            raise SystemExit(3) from None
        client.send({"t": "model", "in_features": in_features})
        if target.type == "cpu":
            torch.set_num_threads(1)  # tiny models: intra-op threads cost more than they give
        options = LoadOptions(self.settings.model_class, target, self.settings.compile,
                              self.settings.max_weights_bytes, self.settings.golden, self.settings.golden_tolerance)
        self.registry = ModelRegistry(options, worker_id)
        follow_commands(client, self.registry, until_serving=True)
        freeze_heap()  # torch and the model: no full collection walks them again
        release_startup_pages()  # what importing torch read and serving never needs
        threading.Thread(target=self._follow, args=(client,), name="control", daemon=True).start()

    def _follow(self, client: ControlClient) -> None:
        from serve.registry import follow_commands

        assert self.registry is not None
        try:
            follow_commands(client, self.registry)
        finally:  # the supervisor is gone: so is this worker
            os._exit(0)

    def inference(self) -> AbstractContextManager:
        """The mode every forward pass runs in (torch's inference mode). The worker's loop enters it once:
        entering it for each batch cost more than the rest of a single-row forward pass's overhead."""
        return self.torch.inference_mode()

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        """Stack the rows of many requests into one (rows, features) tensor (a copy: requests' rows are
        read-only views of their frames, and a model may write to its input)."""
        return self.torch.from_numpy(np.concatenate(inputs) if len(inputs) > 1 else inputs[0].copy())

    def predict(self, x: torch.Tensor) -> tuple[np.ndarray, str]:
        """One forward pass on one snapshot of the live model, inside :meth:`inference`; returns (outputs as
        float32 rows, its version). Conversions a CPU float32 model does not need are skipped."""
        assert self.registry is not None
        model = self.registry.current  # one read: the whole batch uses this version
        assert model is not None
        if model.device.type != "cpu":
            x = x.to(model.device, non_blocking=True)
        y = model.module(x)
        if y.dtype != self.torch.float32 or y.device.type != "cpu":
            y = y.float().cpu()
        outputs = y.numpy()
        if outputs.ndim != 2 or len(outputs) != len(x):
            outputs = outputs.reshape(len(x), -1)
        return outputs, model.version

    def unbatch(self, outputs: np.ndarray, sizes: list[int]) -> list[np.ndarray]:  # type: ignore[override]
        """Split the batch's outputs back into one array per request."""
        if len(sizes) == 1:
            return [outputs]
        return np.split(outputs, np.cumsum(sizes)[:-1])
