"""Classification toy: a two-spiral data set and an MLP, with a train/validation split.

What to try: train at the default rate and watch validation accuracy climb; raise the rate
to 1.0 and watch the loss spike; run the LR range test to find a good rate; apply OneCycleLR.
"""

import math

import torch
from torch import nn

DEFAULTS = {"lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "epochs": 300, "batch_size": 64, "seed": 0}


def _spirals(n, noise, generator):
    t = torch.rand(n, generator=generator) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=generator)
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], 1) / (3 * math.pi)
    x = x + noise * torch.randn(x.shape, generator=generator)
    return x, label


def build_model():
    return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


def build_data(batch_size=64):
    g = torch.Generator().manual_seed(7)
    x, y = _spirals(2400, 0.03, g)
    ds = torch.utils.data.TensorDataset(x, y)
    train, val = torch.utils.data.random_split(ds, [2000, 400], generator=g)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=400))


loss_fn = nn.CrossEntropyLoss()
