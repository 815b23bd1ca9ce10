import torch
from torch import nn


def build_model():
    return nn.Linear(4, 1)


def build_data():
    x = torch.randn(8, 4)
    return [(x, x.sum(1, keepdim=True))]


def loss_fn(output, target):
    return (output - target) ** 2  # forgot .mean(): one loss per sample
