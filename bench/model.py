"""SimpleNN for the benchmark's baseline and compile-mode scripts.

The project's own class (``models.simple_nn:SimpleNN``), so the baseline computes exactly what the
project server computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.simple_nn import SimpleNN


IN_FEATURES = SimpleNN.in_features


def load_model(weights: Path | None) -> nn.Module:
    """A SimpleNN in eval mode, with the ``state_dict`` at ``weights`` if given (else random init)."""
    model = SimpleNN()
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()
