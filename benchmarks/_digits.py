"""The digits MLP the benchmarks wrap: 64-128-128-C, trained by Adam for 60 epochs."""

from __future__ import annotations

import torch
from torch import nn


def digits_mlp(classes: int) -> nn.Sequential:
    """An untrained 64-128-128-``classes`` ReLU MLP."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, classes))


def train_digits_mlp(data, seed: int = 0) -> nn.Module:
    """The MLP trained on ``data.X_train`` [N, 64], ``data.y_train`` [N] (Adam, lr 1e-3,
    batch 64, 60 epochs, seeded), in eval mode."""
    torch.manual_seed(seed)
    net = digits_mlp(data.num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(60):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(data.X_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
    return net.eval()
