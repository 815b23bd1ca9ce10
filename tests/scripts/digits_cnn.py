"""scikit-learn's digits (8x8 images, 10 classes) with a small CNN and plain SGD.

A held-out model for the range test's confirmation; needs scikit-learn.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

DEFAULTS = {"lr": 0.01, "optimizer": "sgd", "momentum": 0.0, "batch_size": 64, "seed": 0}


def build_model():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))


def build_data(batch_size=64):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, val = order[:1500], order[1500:]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[train], y[train]),
                                         batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    return loader, [(x[val], y[val])]


loss_fn = nn.CrossEntropyLoss()
