"""loss_fn blocks for an hour from its fifth call on: a step that never returns (a stuck data source).

The fourth call takes 0.2 s, as a slow step: the steps before the hang are then published (rows are
written in blocks of up to 64, or whenever 0.1 s passed since the last block).
"""

import time

from _linear import build_data, build_model  # noqa: F401

CALLS = [0]


def loss_fn(output, target):
    CALLS[0] += 1
    if CALLS[0] == 4:
        time.sleep(0.2)
    if CALLS[0] >= 5:
        time.sleep(3600)
    return ((output - target) ** 2).mean()
