"""A script that hangs in build_data (an infinite loop): the app must still be able to stop it."""

from torch import nn

DEFAULTS = {"lr": 0.01, "steps": 10}


def build_model():
    return nn.Linear(2, 1)


def build_data():
    while True:
        pass


loss_fn = nn.MSELoss()
