"""Changes the working folder on import and again in build_data (to $LRVIZ_TEST_ELSEWHERE), as scripts
that find their data relative to themselves do: lrviz's outputs and checkpoints must not move with it."""

import os

import torch
from torch import nn

os.chdir(os.environ["LRVIZ_TEST_ELSEWHERE"])


def build_model():
    return nn.Linear(4, 1)


def build_data():
    os.chdir(os.environ["LRVIZ_TEST_ELSEWHERE"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x.sum(1, keepdim=True)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]


loss_fn = nn.MSELoss()
