import torch
from torch import nn


def make_model():  # should have been called build_model
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(8, 4)
    return [(x, x.sum(1, keepdim=True))]


loss_fn = nn.MSELoss()
