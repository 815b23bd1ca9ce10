"""Overfitting: a wide network, a few noisy points

A 1-256-256-1 ReLU network fits 40 noisy samples of a smooth curve (noise std 0.3, so the best
possible validation loss is about 0.09); 500 more samples are the validation set. Each step uses
all 40 points, and validation runs every 10 steps.

What to try:
1. Train as is (Adam, lr 0.01): the validation loss bottoms at 0.092 near step 50 and climbs to
   0.13 by step 3000, while the training loss keeps falling, to 0.02: far below the noise level,
   so the network is memorizing the noise. The gap between the curves is overfitting.
2. Weight decay (the control next to the rate): 1e-3 ends with validation loss 0.106, 1e-2 with
   0.108 and training loss 0.05: half the gap. With optimizer adamw, try 1.0 (ends at 0.103).
3. Set lr 0.1: the big steps cannot settle into the noise (training loss stays near 0.05) and the
   gap is half as wide (validation ends at 0.107). lr 1e-3 overfits just as much, a little later.
4. Set n_train 400: more data closes the gap (0.087 training, 0.093 validation at the end).
   Or width 16: less capacity, validation ends at 0.097.
5. SGD with momentum 0.9 at lr 0.03 overfits more slowly (validation ends at 0.111).
"""

import math

import torch
from torch import nn

DEFAULTS = {"lr": 0.01, "optimizer": "adam", "steps": 3000, "eval_every": 10, "seed": 0}
PARAMS = {
    "n_train": 40,   # training points (the validation set has 500)
    "width": 256,    # width of the two hidden layers
    "noise": 0.3,    # std of the noise on the targets (the signal spans -1..1)
}
N_VAL = 500


def _whole(value, knob, lo, hi):
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if not ok or not lo <= value <= hi:
        raise ValueError(f"{knob} must be a whole number from {lo} to {hi}, not {value!r}")
    return int(value)


def _noise(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise ValueError(f"noise must be a number from 0 to 2, not {value!r}")
    return float(value)


def _target(x):
    return torch.sin(3 * x) * torch.cos(x)


def build_model(width=256):
    width = _whole(width, "width", 1, 4096)
    return nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def build_data(n_train=40, noise=0.3):
    n_train = _whole(n_train, "n_train", 2, 100_000)
    noise = _noise(noise)
    g = torch.Generator().manual_seed(11)
    x = torch.rand(n_train + N_VAL, 1, generator=g) * 2 * math.pi / 3 - math.pi / 3
    y = _target(x) + noise * torch.randn(x.shape, generator=g)
    # the whole training set is one batch: every step is an epoch, and the curves are smooth
    return [(x[:n_train], y[:n_train])], [(x[n_train:], y[n_train:])]


loss_fn = nn.MSELoss()
