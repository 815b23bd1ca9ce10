"""Telling how a run ended badly, truthfully: what the engine's ``run()`` records when training stops
for a reason that is not the usual one.

* A non-finite loss the learning rate cannot have caused (:func:`not_the_rate`): at the first step
  of a fresh run no update has been made yet, and a gradient of exactly 0 means the loss does not
  depend on the weights at all (an empty batch: the mean of nothing is NaN). Advice to lower the rate
  would send the user the wrong way.
* A rate beyond the range of the weights' dtype (:func:`rate_out_of_range`): torch refuses the update
  (``--lr 1e300`` on float32 weights); that is the run diverging, not the script failing.
* ``exit()`` or ``KeyboardInterrupt`` raised by the script while it trains (:func:`exit_error`,
  :func:`interrupt_data`): the run ends failed or stopped, never left 'running'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DivergedError, ScriptError
from .experiment import error_from_exception


def clip_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message must not echo a whole dataset."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({type(value).__name__})"


def not_the_rate(engine: Any) -> ScriptError | None:
    """The error to report instead of a divergence whose first non-finite loss cannot come from the
    learning rate, or None when it may (a finite explosion, or NaN/inf after updates with NaN/inf
    gradients)."""
    buf = engine.buffer
    if buf is None or not len(buf):
        return None
    v = buf.view()
    loss = np.asarray(v["loss"], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(loss))
    if not bad.size:
        return None
    i = int(bad[0])
    step = int(v["step"][i])
    value = float(loss[i])
    exp = engine.experiment
    if float(v["grad_norm"][i]) == 0.0:
        return ScriptError(
            f"the loss was {value} at step {step} with a gradient of exactly 0: it does not depend on the "
            "weights, so the learning rate did not cause it; an empty batch (0 samples) does this, as the mean "
            "of nothing is NaN: check what build_data() yields",
            str(exp.path), exp.line_of("build_data"))
    if step == 0 and engine.origin is None:
        name = exp.loss_name
        return ScriptError(
            f"the loss was {value} at step 0, before any update, so the learning rate did not cause it: "
            f"check the first batch of build_data() and {name}() (NaN or inf in the inputs or targets, log(0), "
            "a division by 0)",
            str(exp.path), exp.line_of(name))
    return None


def rate_out_of_range(engine: Any) -> DivergedError | None:
    """A DivergedError when a learning rate exceeds the largest finite value of the weights' dtype
    (the update cannot even be computed), else None."""
    opt = engine.optimizer
    if opt is None or not engine.lrs:
        return None
    dtypes = {p.dtype for g in opt.param_groups for p in g["params"] if p.is_floating_point()}
    if not dtypes:
        return None
    largest = min(float(torch.finfo(d).max) for d in dtypes)
    lr = max(float(x) for x in engine.lrs)
    if lr <= largest:
        return None
    kinds = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    return DivergedError(
        f"the learning rate {lr:.3g} is beyond the range of the model's {kinds} weights (largest "
        f"{largest:.3g}): the update at step {engine.step} overflowed; try a rate below 1")


def exit_error(exc: BaseException, engine: Any) -> ScriptError:
    """The ScriptError of a script that called ``exit()`` (or raised another BaseException) while the
    run was being prepared or trained."""
    exp = engine.experiment
    where = error_from_exception(exc, exp.path, "training")
    if isinstance(exc, SystemExit):
        code = "" if exc.code is None else repr(exc.code)
        what = f"called exit({code})"
    else:
        what = f"raised {type(exc).__name__}"
    during = f"at training step {engine.step}" if engine.state in ("running", "paused") else "while preparing the run"
    return ScriptError(f"the script {what} {during}; lrviz ended the run as failed (raise an exception "
                       "instead, so the message says what went wrong)", str(exp.path), where.line)


def interrupt_data(exc: KeyboardInterrupt, engine: Any) -> dict[str, Any]:
    """The data of the 'stop' event of a run ended by KeyboardInterrupt: where it was raised, when that
    was in the script (a Ctrl+C in the main thread lands anywhere)."""
    path = Path(engine.experiment.path)
    line = error_from_exception(exc, path, "training").line
    data: dict[str, Any] = {"reason": "KeyboardInterrupt"}
    if line is not None:
        data["where"] = f"{path.name}:{line}"
    return data
