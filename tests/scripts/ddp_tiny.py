"""A tiny regression for the torchrun tests: deterministic, a shuffled DataLoader lrviz shards per rank.

``FAIL_RANK``/``FAIL_STEP`` (environment): that rank raises in compute_loss at that step (a rank's
own error, for the fault tests); with ``FAIL_HOW=kill`` it is killed there instead (SIGKILL: no word).
``PERTURB_RANK``/``PERTURB_STEP``: that rank nudges one weight at that step (its parameters then
differ from the other ranks': the negative control of ``ranks_in_sync``). ``LOSSES_DIR``: each rank
appends its training losses to ``rank{RANK}.txt`` there.
"""

import os
import signal

import torch
from torch import nn

DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "momentum": 0.9, "steps": 200, "seed": 0}
PARAMS = {"n": 512}

_steps = {"n": 0}


def build_model():
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))


def build_data(batch_size=16, n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(n, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
    return train, [(x[:64], y[:64])]


def _now(what, step):
    """Whether ``{what}_RANK``/``{what}_STEP`` name this rank and this training step."""
    env = os.environ
    return env.get(f"{what}_RANK") == env.get("RANK") and step == int(env.get(f"{what}_STEP", "-1"))


def compute_loss(model, batch):
    x, y = batch
    step = _steps["n"]
    if model.training:  # validation calls this too
        _steps["n"] += 1
        if _now("FAIL", step):
            if os.environ.get("FAIL_HOW") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"rank {os.environ['RANK']} cannot go on at step {step}")
        if _now("PERTURB", step):
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1e-3
    loss = nn.functional.mse_loss(model(x), y)
    if model.training and os.environ.get("LOSSES_DIR"):  # each rank's own losses, one a line
        with open(os.path.join(os.environ["LOSSES_DIR"], f"rank{os.environ['RANK']}.txt"), "a") as f:
            f.write(f"{loss.item()!r}\n")
    return loss
