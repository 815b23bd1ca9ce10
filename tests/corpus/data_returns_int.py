import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(8, 4)
    batches = [(x, x.sum(1, keepdim=True))]
    return len(batches)  # meant to return the batches


loss_fn = nn.MSELoss()
