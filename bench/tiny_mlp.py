"""The benchmark experiment: a tiny MLP on pre-made batches (data loading costs nothing)."""

import torch
from torch import nn

DEFAULTS = {"lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "seed": 0}


def build_model():
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def build_data(batch_size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * 500, 10, generator=g)
    y = x[:, :1] * 2 + 0.1 * torch.randn(batch_size * 500, 1, generator=g)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


loss_fn = nn.MSELoss()
