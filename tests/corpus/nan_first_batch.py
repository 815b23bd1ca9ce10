"""A NaN input in the very first batch: the loss is NaN before any update, whatever the rate."""

import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(16, 4)
    y = x.sum(1, keepdim=True)
    x[0, 0] = float("nan")  # a corrupt feature in the first batch
    return [(x[:8], y[:8]), (x[8:], y[8:])]


loss_fn = nn.MSELoss()
