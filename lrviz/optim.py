"""Optimizers by name, and the hyperparameters that can change mid-run."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import ConfigError


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (sgd, adam, adamw, rmsprop, adagrad).

    For adam/adamw, ``momentum`` > 0 sets beta1 (0 keeps torch's default 0.9).
    """
    name = name.lower()
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        kw = {"betas": (momentum, 0.999)} if momentum > 0 else {}
        wd = weight_decay if (weight_decay or name == "adam") else 0.01
        return cls(params, lr=lr, weight_decay=wd, **kw)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adagrad":
        if momentum:
            raise ConfigError("adagrad has no momentum; set momentum to 0 or pick sgd, adam or rmsprop")
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of sgd, adam, adamw, rmsprop, adagrad")


def apply_hyperparams(
    optimizer: torch.optim.Optimizer, momentum: float | None = None, weight_decay: float | None = None
) -> dict[str, float]:
    """Set momentum (beta1 for Adam-like optimizers) and/or weight decay on every param group.

    Returns what was applied; raises ConfigError when the optimizer has no such setting.
    """
    applied: dict[str, float] = {}
    for group in optimizer.param_groups:
        if momentum is not None:
            if "momentum" in group:
                group["momentum"] = float(momentum)
            elif "betas" in group:
                group["betas"] = (float(momentum), group["betas"][1])
            else:
                raise ConfigError(f"{type(optimizer).__name__} has no momentum to set")
            applied["momentum"] = float(momentum)
        if weight_decay is not None:
            if "weight_decay" not in group:
                raise ConfigError(f"{type(optimizer).__name__} has no weight decay to set")
            group["weight_decay"] = float(weight_decay)
            applied["weight_decay"] = float(weight_decay)
    return applied


def current_hyperparams(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Momentum (or beta1) and weight decay of the first param group, where the optimizer has them."""
    g = optimizer.param_groups[0]
    out: dict[str, float] = {}
    if "momentum" in g:
        out["momentum"] = float(g["momentum"])
    elif "betas" in g:
        out["momentum"] = float(g["betas"][0])
    if "weight_decay" in g:
        out["weight_decay"] = float(g["weight_decay"])
    return out
