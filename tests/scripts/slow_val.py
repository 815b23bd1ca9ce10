"""Training data is quick; the validation pass is very slow (for the prompt-stop test)."""

import time

import torch
from torch import nn

DEFAULTS = {"lr": 0.01, "steps": 10_000, "eval_every": 5}


class SlowBatches:
    def __iter__(self):
        for _ in range(10_000):
            time.sleep(0.01)
            yield torch.zeros(2, 2), torch.zeros(2, 1)


def build_model():
    return nn.Linear(2, 1)


def build_data():
    return [(torch.randn(8, 2), torch.randn(8, 1))] * 4, SlowBatches()


loss_fn = nn.MSELoss()
