"""Re-make the shipped weights: ``python -m models.train_simple_nn [--out weights/model.pth]``.

The task is a synthetic regression with a fixed seed, so the file can be re-made bit for bit on the
same torch build: x ~ N(0, 1)^10 and y = relu(x0 + x1 - x2) + 0.5 * x3 - 0.25 * x4 + 0.1 * sum(x5..x9).
SimpleNN is trained for 300 full-batch Adam steps on 2,048 samples (about a second on a CPU) and
saved the standard way: ``torch.save(model.state_dict(), path)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.simple_nn import SimpleNN

SEED = 0
SAMPLES = 2048
STEPS = 300


def make_dataset(samples: int = SAMPLES, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented synthetic regression task: inputs (samples, 10) and targets (samples, 1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 10, generator=generator)
    y = torch.relu(x[:, 0] + x[:, 1] - x[:, 2]) + 0.5 * x[:, 3] - 0.25 * x[:, 4] + 0.1 * x[:, 5:].sum(dim=1)
    return x, y.unsqueeze(1)


def train(steps: int = STEPS, seed: int = SEED) -> SimpleNN:
    """Train SimpleNN deterministically on the synthetic task and return it in eval mode."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model = SimpleNN()
    x, y = make_dataset(seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("weights/model.pth"))
    args = parser.parse_args(argv)
    model = train()
    x, y = make_dataset(samples=512, seed=SEED + 1)
    with torch.inference_mode():
        mse = torch.nn.functional.mse_loss(model(x), y).item()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out} (held-out MSE {mse:.4f})")


if __name__ == "__main__":
    main()
