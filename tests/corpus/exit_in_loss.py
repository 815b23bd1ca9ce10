"""loss_fn calls sys.exit() on its third call, as a script written for its own loop might."""

import sys

from _linear import build_data, build_model  # noqa: F401

CALLS = [0]


def loss_fn(output, target):
    CALLS[0] += 1
    if CALLS[0] == 3:
        sys.exit(3)
    return ((output - target) ** 2).mean()
