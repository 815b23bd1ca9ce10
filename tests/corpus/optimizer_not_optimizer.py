import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(8, 4)
    return [(x, x.sum(1, keepdim=True))]


def build_optimizer(params, lr):
    torch.optim.SGD(params, lr=lr)  # forgot the return


loss_fn = nn.MSELoss()
