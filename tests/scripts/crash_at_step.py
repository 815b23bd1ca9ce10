"""A script whose loss function crashes the interpreter (a segfault) at step CRASH_AT."""

import ctypes

import torch
from torch import nn

DEFAULTS = {"lr": 0.01, "steps": 100000}
CRASH_AT = 50
_calls = 0


def build_model():
    return nn.Linear(2, 1)


def build_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    return [(x, x.sum(1, keepdim=True))]


def compute_loss(model, batch):
    global _calls
    _calls += 1
    if _calls > CRASH_AT:
        ctypes.string_at(0)  # SIGSEGV
    x, y = batch
    return nn.functional.mse_loss(model(x), y)
