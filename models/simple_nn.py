"""The model from the PyTorch tutorial on saving and loading model states."""

import torch
from torch import nn


class SimpleNN(nn.Module):
    """Linear(10 -> 5), ReLU, Linear(5 -> 1), exactly as the tutorial defines it.

    ``in_features`` tells the server how many numbers one input row has, so requests can be
    validated before they reach the model.
    """

    in_features = 10

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.relu(x)
        x = self.fc2(x)
        return x
