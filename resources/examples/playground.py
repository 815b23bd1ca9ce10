"""Playground: 2-D classification with knobs for the data and the initialization

Two classes of points in the plane, as in TensorFlow Playground: a 2-32-32-2 tanh network,
800 training and 400 validation points. The knobs choose the data set, its noise, wrong labels,
the initialization and the width.

What to try (on the spiral, SGD with momentum 0.9, 100 epochs):
1. Train as is (lr 0.03, init xavier): the loss leaves 0.69 after about 15 epochs and the
   validation accuracy ends near 98%.
2. Set lr 0.003: it crawls (74% after 100 epochs). lr 0.3: it bounces and never learns the
   spiral (about 55%). lr 1.0: it diverges within a few epochs.
3. Set init 'default' (PyTorch's own, small for tanh): the loss sits at 0.69 for about 60
   epochs at lr 0.03 and never leaves it at lr 0.01. With init 'kaiming' it learns within 5
   epochs, and even lr 0.003 reaches 97%.
4. Set init 'normal' with init_scale 3: the loss starts near 10 (saturated units, huge logits).
   It fits the training points closely, but the boundary is jagged: the final validation loss
   is 10-25x the training loss (about 3x with xavier). With init_scale 10 the loss starts near
   40 and lr 0.003 ends at validation loss 1.3; lr 0.03 still works, 0.3 diverges.
5. Set label_noise 0.2: a fifth of the training labels are wrong, so the training loss cannot
   fall below about 0.5; watch the validation curve instead. lr 0.03 to 0.1 reach 82-97%
   validation accuracy (depending on seed and data_seed), 0.01 only about 70% in 100 epochs,
   and 0.3 never learns the spiral (about 53%).
6. Try dataset 'circles', 'xor' or 'gaussians': they learn within a few epochs at lr 0.01 to
   0.03 and blow up at lr 1.0 (circles already spikes late at 0.1).
"""

import math

import torch
from torch import nn

DEFAULTS = {"lr": 0.03, "optimizer": "sgd", "momentum": 0.9, "epochs": 100, "batch_size": 32, "seed": 0}
PARAMS = {
    "dataset": "spiral",   # 'spiral' | 'circles' | 'xor' | 'gaussians'
    "noise": 0.05,         # std of the noise added to the points (the data spans about -1..1)
    "label_noise": 0.0,    # fraction of training labels flipped at random (0 .. 0.5)
    "init": "xavier",      # 'default' (PyTorch's) | 'xavier' | 'kaiming' | 'normal'
    "init_scale": 1.0,     # std of the weights for init 'normal'
    "hidden": 32,          # width of the two hidden layers
    "data_seed": 0,        # which random data set
}

DATASETS = ("spiral", "circles", "xor", "gaussians")
INITS = ("default", "xavier", "kaiming", "normal")
#: The choices of the text knobs (for a drop-down list).
PARAM_CHOICES = {"dataset": DATASETS, "init": INITS}
N_TRAIN, N_VAL = 800, 400


# ---- checking the knobs ------------------------------------------------------------------------------
def _choice(value, knob, allowed):
    if value not in allowed:
        raise ValueError(f"{knob} must be one of {', '.join(map(repr, allowed))}, not {value!r}")
    return value


def _number(value, knob, lo, hi, lo_open=False):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        span = f"above {lo:g} and at most {hi:g}" if lo_open else f"from {lo:g} to {hi:g}"
        raise ValueError(f"{knob} must be a number {span}, not {value!r}")
    return float(value)


def _whole(value, knob, lo, hi):
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if not ok or not lo <= value <= hi:
        raise ValueError(f"{knob} must be a whole number from {lo} to {hi}, not {value!r}")
    return int(value)


# ---- the data ----------------------------------------------------------------------------------------
def _points(dataset, n, g):
    """n points in about [-1, 1]^2 and their labels (0/1), half of each class."""
    label = torch.arange(n) % 2
    if dataset == "spiral":  # two interleaved arms, 1.25 turns each
        t = torch.rand(n, generator=g) * 2.5 * math.pi
        angle = t + math.pi * label
        r = t / (2.5 * math.pi) * 0.95 + 0.05
        x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1)
    elif dataset == "circles":  # a disk inside a ring
        r = torch.where(label == 0, torch.rand(n, generator=g) * 0.45, 0.65 + torch.rand(n, generator=g) * 0.3)
        a = torch.rand(n, generator=g) * 2 * math.pi
        x = torch.stack([r * torch.cos(a), r * torch.sin(a)], 1)
    elif dataset == "xor":  # the class is whether x and y have the same sign
        x = torch.rand(n, 2, generator=g) * 2 - 1
        x = x + 0.05 * torch.sign(x)  # a small gap along the axes
        label = (x[:, 0] * x[:, 1] < 0).long()
    else:  # gaussians: two blobs
        centre = torch.tensor([[0.4, 0.4], [-0.4, -0.4]])[label]
        x = centre + 0.2 * torch.randn(n, 2, generator=g)
    return x, label


def build_data(batch_size=32, dataset="spiral", noise=0.05, label_noise=0.0, data_seed=0):
    _choice(dataset, "dataset", DATASETS)
    noise = _number(noise, "noise", 0.0, 1.0)
    label_noise = _number(label_noise, "label_noise", 0.0, 0.5)
    data_seed = _whole(data_seed, "data_seed", 0, 2**31 - 1)
    g = torch.Generator().manual_seed(data_seed)
    x, y = _points(dataset, N_TRAIN + N_VAL, g)
    x = x + noise * torch.randn(x.shape, generator=g)
    xt, yt, xv, yv = x[:N_TRAIN], y[:N_TRAIN].clone(), x[N_TRAIN:], y[N_TRAIN:]
    flip = torch.rand(N_TRAIN, generator=g) < label_noise  # only training labels: val stays the truth
    yt[flip] = 1 - yt[flip]
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=batch_size,
                                        shuffle=True)
    return train, [(xv, yv)]


# ---- the model ---------------------------------------------------------------------------------------
def build_model(hidden=16, init="default", init_scale=1.0):
    hidden = _whole(hidden, "hidden", 1, 1024)
    _choice(init, "init", INITS)
    init_scale = _number(init_scale, "init_scale", 0.0, 100.0, lo_open=True)
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                          nn.Linear(hidden, 2))
    if init != "default":
        for layer in model:
            if isinstance(layer, nn.Linear):
                if init == "xavier":
                    nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain("tanh"))
                elif init == "kaiming":
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="tanh")
                else:
                    nn.init.normal_(layer.weight, 0.0, init_scale)
                nn.init.zeros_(layer.bias)
    return model


loss_fn = nn.CrossEntropyLoss()
