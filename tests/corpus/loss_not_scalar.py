from _linear import build_data, build_model  # noqa: F401


def loss_fn(output, target):
    return (output - target) ** 2  # forgot .mean(): one loss per sample
