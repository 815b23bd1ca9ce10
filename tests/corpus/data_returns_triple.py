import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(24, 4)
    y = x.sum(1, keepdim=True)
    train, val, test = [(x[:8], y[:8])], [(x[8:16], y[8:16])], [(x[16:], y[16:])]
    return train, val, test


loss_fn = nn.MSELoss()
