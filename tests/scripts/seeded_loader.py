"""A DataLoader with its own seeded generator (torch's reproducibility recipe), or a plain shuffling one.

``compute_loss`` records the dataset indices of every batch it trains on in ``SEEN``, so a test can
compare the data order lrviz trains on with the script's own loop.
"""

import torch
from torch import nn

DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "momentum": 0.9, "steps": 200, "seed": 0}
#: generator: the loader gets DataLoader(generator=...); dropout: randomness inside the steps too.
PARAMS = {"generator": True, "dropout": 0.0}
SEEN: list[list[int]] = []


def build_model(dropout=0.0):
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))


def build_data(batch_size=16, generator=True):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(200, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(200))
    order = torch.Generator().manual_seed(2024) if generator else None
    train = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=order)
    return train, [(x[:64], y[:64], torch.arange(64))]


def compute_loss(model, batch):
    x, y, idx = batch
    if model.training:
        SEEN.append(idx.tolist())
    return nn.functional.mse_loss(model(x), y)
