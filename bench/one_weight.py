"""The cheapest training step there is (one weight, one sample): a long history builds fast.
Used by bench/memory.py to measure what a run's history costs in memory."""

import torch
from torch import nn

DEFAULTS = {"lr": 0.01, "optimizer": "sgd", "steps": 1000, "seed": 0}


def build_model():
    return nn.Linear(1, 1)


def build_data():
    x = torch.ones(1, 1)
    return [(x, 2 * x)]


loss_fn = nn.MSELoss()
