import torch
from torch import nn
from _linear import build_data, build_model  # noqa: F401


def build_optimizer(params, lr):
    torch.optim.SGD(params, lr=lr)  # forgot the return


loss_fn = nn.MSELoss()
