import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(8, 5)  # five features, the model takes four
    return [(x, x.sum(1, keepdim=True))]


loss_fn = nn.MSELoss()
