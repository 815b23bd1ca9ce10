import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(8, 4)
    weights = torch.ones(8)
    return [(x, x.sum(1, keepdim=True), weights)]  # (inputs, targets, weights), but no compute_loss


loss_fn = nn.MSELoss()
