"""compute_loss with dict batches: a tiny recommender-like model whose batches are dicts.

Shows the script contract for batches that are not (inputs, targets) pairs: define
compute_loss(model, batch). What to try: compare adam at 1e-3 with sgd at 0.1.
"""

import torch
from torch import nn

DEFAULTS = {"lr": 0.003, "optimizer": "adam", "steps": 1500, "seed": 0}


class DotModel(nn.Module):
    def __init__(self, users=50, items=80, dim=8):
        super().__init__()
        self.user = nn.Embedding(users, dim)
        self.item = nn.Embedding(items, dim)

    def forward(self, user, item):
        return (self.user(user) * self.item(item)).sum(-1)


def build_model():
    return DotModel()


def build_data(batch_size=128):
    g = torch.Generator().manual_seed(3)
    true_u, true_i = torch.randn(50, 4, generator=g), torch.randn(80, 4, generator=g)
    u = torch.randint(0, 50, (6000,), generator=g)
    i = torch.randint(0, 80, (6000,), generator=g)
    r = (true_u[u] * true_i[i]).sum(-1) + 0.1 * torch.randn(6000, generator=g)

    def batches(lo, hi):
        return [{"user": u[k:k + batch_size], "item": i[k:k + batch_size], "rating": r[k:k + batch_size]}
                for k in range(lo, hi, batch_size)]

    return batches(0, 5000), batches(5000, 6000)


def compute_loss(model, batch):
    pred = model(batch["user"], batch["item"])
    return nn.functional.mse_loss(pred, batch["rating"])
