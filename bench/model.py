"""SimpleNN for the benchmark's baseline and compile-mode scripts.

The project's own class (``models.simple_nn:SimpleNN``) is used whenever it can be imported, so the
baseline computes exactly what the project server computes. The fallback below is an identical copy
(same layer names, so the same ``state_dict`` loads into it) for checkouts that lack ``models/``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

try:
    from models.simple_nn import SimpleNN
except ImportError:  # pragma: no cover - only without the project's models package

    class SimpleNN(nn.Module):  # type: ignore[no-redef]
        """Linear(10 -> 5), ReLU, Linear(5 -> 1): a copy of ``models.simple_nn.SimpleNN``."""

        in_features = 10

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(10, 5)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc2(self.relu(self.fc1(x)))
            return out


IN_FEATURES = 10


def load_model(weights: Path | None) -> nn.Module:
    """A SimpleNN in eval mode, with the ``state_dict`` at ``weights`` if given (else random init)."""
    model = SimpleNN()
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


def weights_version(weights: Path) -> str:
    """A short content id for a weights file: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
