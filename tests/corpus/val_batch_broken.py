import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(8, 4)
    y = x.sum(1, keepdim=True)
    return [(x, y)], [(x, y, "id")]  # validation batches carry an extra field


loss_fn = nn.MSELoss()
