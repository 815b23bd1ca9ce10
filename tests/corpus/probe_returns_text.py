"""probe() returns text instead of a dict of numbers."""

import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(16, 4)
    y = x.sum(1, keepdim=True)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def probe(model):
    return f"weight norm {model.weight.norm():.3f}"


loss_fn = nn.MSELoss()
