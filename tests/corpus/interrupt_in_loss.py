"""loss_fn raises KeyboardInterrupt on its third call (as a Ctrl+C inside the script's own code would)."""

from _linear import build_data, build_model  # noqa: F401

CALLS = [0]


def loss_fn(output, target):
    CALLS[0] += 1
    if CALLS[0] == 3:
        raise KeyboardInterrupt
    return ((output - target) ** 2).mean()
