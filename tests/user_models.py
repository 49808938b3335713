"""User-style model classes the tests serve through SIMPLENN_MODEL_CLASS."""

import os
import time

from models.simple_nn import SimpleNN


class SlowSimpleNN(SimpleNN):
    """SimpleNN whose forward pass takes SLOW_FORWARD_S seconds (default 0.5): makes requests stay in flight."""

    def forward(self, x):
        time.sleep(float(os.environ.get("SLOW_FORWARD_S", "0.5")))
        return super().forward(x)


class NotAModule:
    """Not an ``nn.Module``: the server must refuse to start with it."""
