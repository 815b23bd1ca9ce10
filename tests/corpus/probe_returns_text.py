"""probe() returns text instead of a dict of numbers."""

from torch import nn

from _linear import build_data, build_model  # noqa: F401


def probe(model):
    return f"weight norm {model.weight.norm():.3f}"


loss_fn = nn.MSELoss()
