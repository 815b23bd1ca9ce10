"""A tiny regression whose loss records the dtype it was computed in (mixed-precision tests).

``loss_scale`` multiplies the loss: large values make fp16 gradients overflow, so a gradient
scaler skips steps.
"""

import torch
from torch import nn

DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "steps": 60, "seed": 0}
PARAMS = {"loss_scale": 1.0}

#: (grad enabled, dtype of the model's output) of every loss computed, training and validation.
SEEN = []


def build_model(loss_scale=1.0):
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    model.loss_scale = loss_scale
    return model


def build_data(batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(512, 1, generator=g)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    return train, [(x[:64], y[:64])]


def compute_loss(model, batch):
    x, y = batch
    out = model(x)
    SEEN.append((torch.is_grad_enabled(), out.dtype))
    return nn.functional.mse_loss(out.float(), y) * model.loss_scale
