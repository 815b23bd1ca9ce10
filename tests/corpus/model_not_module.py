import torch
from torch import nn


def build_model():
    w = torch.zeros(4, 1, requires_grad=True)
    return lambda x: x @ w  # a function, not an nn.Module


def build_data():
    x = torch.randn(8, 4)
    return [(x, x.sum(1, keepdim=True))]


loss_fn = nn.MSELoss()
