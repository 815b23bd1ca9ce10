"""A tiny regression for the torchrun tests: deterministic, a shuffled DataLoader lrviz shards per rank.

``FAIL_RANK``/``FAIL_STEP`` (environment): that rank raises in compute_loss at that step (a rank's
own error, for the fault tests).
"""

import os

import torch
from torch import nn

DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "momentum": 0.9, "steps": 200, "seed": 0}
PARAMS = {"n": 512}

_steps = {"n": 0}


def build_model():
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))


def build_data(batch_size=16, n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(n, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
    return train, [(x[:64], y[:64])]


def compute_loss(model, batch):
    x, y = batch
    step = _steps["n"]
    _steps["n"] += 1
    if os.environ.get("FAIL_RANK") == os.environ.get("RANK") and step == int(os.environ.get("FAIL_STEP", "-1")):
        raise ValueError(f"rank {os.environ['RANK']} cannot go on at step {step}")
    return nn.functional.mse_loss(model(x), y)
