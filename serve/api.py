"""The LitAPI: what each inference worker does with a batch of validated rows.

``setup`` (in the spawned worker, never at import) resolves the device, loads and verifies the
weights through the registry and starts its watcher. ``batch`` stacks the rows of many requests,
``predict`` runs one forward pass on one registry snapshot and returns the outputs with the version
that computed them, ``unbatch`` splits them back per request. The worker's loop is
:class:`serve.transport.BatchingLoop`.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import litserve as ls
from litserve.specs.base import LitSpec
import numpy as np
import torch

from serve.errors import WeightsError
from serve.loader import LoadOptions, resolve_device
from serve.logs import configure_logging
from serve.process import detach_worker
from serve.registry import ModelRegistry
from serve.settings import Settings
from serve.source import WeightsSource
from serve.transport import BatchingLoop

logger = logging.getLogger(__name__)


class Control:
    """Commands from the main process and API servers to every worker: counters that only grow."""

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.rescans = ctx.Value("i", 0)
        self.rollbacks = ctx.Value("i", 0)

    def request_rescan(self) -> None:
        with self.rescans.get_lock():
            self.rescans.value += 1

    def request_rollback(self) -> None:
        with self.rollbacks.get_lock():
            self.rollbacks.value += 1


class ServingAPI(ls.LitAPI):
    """SimpleNN (or any ``nn.Module`` named by ``SIMPLENN_MODEL_CLASS``) behind LitServe."""

    def __init__(self, settings: Settings, control: Control, spec: LitSpec, status_dir: Path) -> None:
        super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout_ms / 1000,
                         loop=BatchingLoop(), spec=spec)
        self.settings = settings
        self.control = control
        self.status_dir = status_dir
        self.registry: ModelRegistry | None = None

    def setup(self, device: str) -> None:
        """Load and verify the weights on this worker's device, then start watching for new ones."""
        detach_worker()  # the main process coordinates shutdown
        configure_logging(self.settings.log_level)
        worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        try:
            target = resolve_device(self.settings.device, assigned=device)
            if target.type == "cpu":
                torch.set_num_threads(1)  # tiny models: intra-op threads cost more than they give
            options = LoadOptions(self.settings.model_class, target, self.settings.compile,
                                  self.settings.max_weights_bytes, self.settings.golden, self.settings.golden_tolerance)
            source = WeightsSource(self.settings.weights, poll_interval=self.settings.poll_interval_s,
                                   debounce=self.settings.reload_debounce_s, use_events=self.settings.watch_events)
            self.registry = ModelRegistry(options, source, worker_id, self.status_dir)
            self.registry.load_initial()
        except (WeightsError, ValueError, OSError) as exc:
            message = getattr(exc, "message", str(exc))
            (self.status_dir / f"startup-error-{worker_id}.txt").write_text(message)
            logger.error("worker %d cannot start: %s", worker_id, message)
            os._exit(3)
        self.registry.start()
        threading.Thread(target=self._follow_control, name="control", daemon=True).start()

    def _follow_control(self) -> None:
        assert self.registry is not None
        seen_rescans, seen_rollbacks = self.control.rescans.value, self.control.rollbacks.value
        stop = threading.Event()
        while not stop.wait(0.05):
            rescans, rollbacks = self.control.rescans.value, self.control.rollbacks.value
            if rollbacks != seen_rollbacks:
                seen_rollbacks = rollbacks
                self.registry.rollback()
            if rescans != seen_rescans:
                seen_rescans = rescans
                self.registry.rescan()

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        """Stack the rows of many requests into one (rows, features) tensor."""
        return torch.from_numpy(np.concatenate(inputs))

    def predict(self, x: torch.Tensor) -> tuple[np.ndarray, str]:
        """One forward pass on one snapshot of the live model; returns (outputs, its version)."""
        assert self.registry is not None
        model = self.registry.current  # one read: the whole batch uses this version
        assert model is not None
        with torch.inference_mode():
            y = model.module(x.to(model.device, non_blocking=True))
        return y.float().cpu().numpy().reshape(len(x), -1), model.version

    def unbatch(self, outputs: np.ndarray, sizes: list[int]) -> list[np.ndarray]:  # type: ignore[override]
        """Split the batch's outputs back into one array per request."""
        if len(sizes) == 1:
            return [outputs]
        return np.split(outputs, np.cumsum(sizes)[:-1])
