"""Regression toy: fit a noisy sine with a small MLP (mean squared error).

What to try: start at lr 0.05 with SGD and watch the loss fall; set 0.5 mid-run and watch it
oscillate; set 1e-4 and watch it crawl. Then apply CosineAnnealingLR and compare.
"""

import math

import torch
from torch import nn

DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "momentum": 0.9, "steps": 2000, "batch_size": 64, "seed": 0}


def build_model():
    return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def build_data(batch_size=64):
    g = torch.Generator().manual_seed(1234)
    x = torch.rand(2048, 1, generator=g) * 2 * math.pi - math.pi
    y = torch.sin(x) + 0.1 * torch.randn(x.shape, generator=g)
    xv = torch.linspace(-math.pi, math.pi, 256).unsqueeze(1)
    yv = torch.sin(xv)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                        shuffle=True)
    val = [(xv, yv)]
    return train, val


loss_fn = nn.MSELoss()
