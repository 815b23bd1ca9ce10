"""A tiny deterministic regression used by the engine tests."""

import torch
from torch import nn

DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "steps": 200, "seed": 0}
PARAMS = {"val": True, "n": 512}


def build_model():
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def build_data(batch_size=16, val=True, n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(n, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
    if not val:
        return train
    return train, [(x[:64], y[:64])]


loss_fn = nn.MSELoss()
