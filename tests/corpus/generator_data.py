import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(16, 4)
    y = x.sum(1, keepdim=True)
    return ((x[i : i + 8], y[i : i + 8]) for i in range(0, 16, 8))


loss_fn = nn.MSELoss()
