"""The models one inference worker holds, and the commands that change them (TF Serving's servable
handles, on the worker's side of the manager).

The worker serves ``current``; ``previous`` is kept for an instant rollback and ``staged`` holds a
version that was loaded and verified but is not served yet. Batches read ``registry.current`` once
(one attribute read), so a batch never mixes versions and a swap happens between batches. The
worker never decides what to serve: the supervisor's manager says ``load`` or ``serve`` over the
control channel (:func:`follow_commands`), and the worker answers ``loaded``, ``serving`` or ``rejected``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from serve import metrics
from serve.control import ControlClient
from serve.errors import WeightsError
from serve.loader import LoadedModel, LoadOptions, load_model

logger = logging.getLogger(__name__)


class ModelRegistry:
    """Served, previous and staged model of one worker."""

    def __init__(self, options: LoadOptions, worker_id: int) -> None:
        self.options = options
        self.worker_id = worker_id
        self.current: LoadedModel | None = None
        self.previous: LoadedModel | None = None
        self.staged: LoadedModel | None = None

    def _held(self, sha256: str) -> LoadedModel | None:
        for model in (self.current, self.previous, self.staged):
            if model is not None and model.sha256 == sha256:
                return model
        return None

    def load(self, command: dict[str, Any]) -> LoadedModel:
        """Load and verify the commanded version (unless held already) and keep it aside."""
        model = self._held(command["sha256"])
        if model is None:
            model = load_model(Path(command["path"]), self.options, command["sha256"], origin=Path(command["origin"]))
            self.staged = model
        return model

    def serve(self, command: dict[str, Any]) -> LoadedModel:
        """Serve the commanded version from now on (loading it first if it is not held)."""
        model = self.load(command)
        if model is not self.current:
            self.previous, self.current = self.current, model  # the swap: batches read `current` once
            if self.staged is model:
                self.staged = None
            metrics.set_live_version(model.version, self.worker_id)
            logger.info("worker %d now serves version %s", self.worker_id, model.version)
        return model


def follow_commands(client: ControlClient, registry: ModelRegistry, until_serving: bool = False) -> None:
    """Carry out the manager's commands; with ``until_serving``, return once a version is served.
    Returns when the supervisor is gone (the worker then exits: it dies with the supervisor)."""
    while True:
        message = client.receive()
        if message is None:
            continue
        kind = message.get("t")
        if kind not in ("load", "serve"):
            continue
        try:
            model = registry.load(message) if kind == "load" else registry.serve(message)
        except WeightsError as exc:
            logger.warning("worker %d rejected version %s: %s", registry.worker_id, message["version"], exc.message)
            client.send({"t": "rejected", "version": message["version"], "error": exc.message, "reason": exc.reason})
            continue
        if kind == "load":
            client.send({"t": "loaded", "version": model.version})
            continue
        client.send({"t": "serving", "version": model.version, "loaded_at": model.loaded_at})
        if until_serving:
            return
