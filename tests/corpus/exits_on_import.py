import sys

from torch import nn
from _linear import build_data, build_model  # noqa: F401

loss_fn = nn.MSELoss()


def main():
    model = build_model()
    return 0 if model is not None else 1


sys.exit(main())  # a standalone training script without the __main__ guard
