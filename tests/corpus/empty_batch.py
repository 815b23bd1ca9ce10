"""The second batch holds 0 samples: its mean loss is NaN, and the learning rate has nothing to do with it."""

import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(16, 4)
    y = x.sum(1, keepdim=True)
    return [(x[:8], y[:8]), (x[8:8], y[8:8]), (x[8:], y[8:])]


loss_fn = nn.MSELoss()
