"""Learning-rate diagnostics: the generalization gap, per-layer update ratios, early stopping.

- :func:`generalization` compares the validation loss with the (smoothed) training loss at the
  validation steps and says whether the run is overfitting, underfitting or fine.
- :class:`LayerProbe` records, every few steps, each layer's gradient norm and the size of its
  update relative to its weights, ``log10(||dw|| / ||w||)``; about -3 (updates of 1/1000 of the
  weights per step) is the usual healthy value, much higher means the rate is too high for that
  layer, much lower that it barely learns.
- :class:`EarlyStopping` says when the validation loss has stopped improving.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .generalization import (  # the gap and its verdict: no torch
    UPDATE_RATIO_REFERENCE,
    VERDICTS,
    GapReport,
    generalization,
    run_generalization,
)

__all__ = ["UPDATE_RATIO_REFERENCE", "VERDICTS", "EarlyStopping", "GapReport", "LayerProbe", "generalization",
           "run_generalization"]


# ---- per-layer gradient norms and update ratios ------------------------------------------------------
class LayerProbe:
    """Per-layer gradient norm and update-to-weight ratio, every ``every`` steps.

    Call :meth:`before_step` just before ``optimizer.step()`` and :meth:`after_step` just after it.
    On steps where ``step % every != 0`` both return after one modulo. On the others,
    ``before_step`` copies the weights into buffers kept for the purpose (allocated once: one copy of
    the trainable weights) with one ``torch._foreach_copy_``, and ``after_step`` computes per layer
    ``||grad||``, ``||w||`` (before the step) and ``log10(||w_after - w_before|| / ||w_before||)``
    with foreach kernels. Results stay on the model's device until read, so a GPU run gets no host
    sync per probed step.

    ``group='parameter'`` (default) reports each named parameter (``'0.weight'``); ``'module'``
    combines the parameters of each module that owns some (``'0'``), norms as root sums of squares.
    Read ``steps``, ``names``, ``grad_norm``, ``weight_norm``, ``update_ratio`` (lists of arrays
    over ``names``) or :meth:`as_arrays`. Reading from another thread is safe.
    """

    def __init__(self, model: torch.nn.Module, every: int = 25, group: str = "parameter"):
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"layer statistics need a whole number of steps of 1 or more, not {every!r}")
        if group not in ("parameter", "module"):
            raise ConfigError(f"group must be 'parameter' or 'module', not {group!r}")
        self.every = every
        self.group = group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        if group == "module":
            owners: dict[str, int] = {}
            index = []
            for n, _ in named:
                owner = n.rpartition(".")[0] or "(model)"
                index.append(owners.setdefault(owner, len(owners)))
            self.names: list[str] = list(owners)
            self._index: torch.Tensor | None = torch.tensor(index, dtype=torch.long)
        else:
            self.names = [n for n, _ in named]
            self._index = None
        self._copies: list[torch.Tensor] | None = None
        self._armed = -1  # the step whose weights are in the copies
        self._lock = threading.Lock()
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._steps: list[int] = []
        self._grad: list[np.ndarray] = []
        self._weight: list[np.ndarray] = []
        self._ratio: list[np.ndarray] = []

    # ---- the per-step calls ---------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Just before ``optimizer.step()``: keep a copy of the weights on probed steps."""
        if step % self.every:
            return
        params = self._params
        if not params:
            return
        with torch.no_grad():
            if self._copies is None:
                self._copies = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
            torch._foreach_copy_(self._copies, [p.detach() for p in params])
        self._armed = step

    def after_step(self, step: int) -> None:
        """Just after ``optimizer.step()``: record gradient norms and update ratios of probed steps."""
        if step % self.every:
            return
        if self._armed != step or self._copies is None:
            return
        self._armed = -1
        params = self._params
        copies = self._copies
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else _ZERO.to(p.device) for p in params]
            weights = [p.detach() for p in params]
            w_norm = torch._foreach_norm(copies)
            torch._foreach_sub_(copies, weights)  # copies now hold -(update)
            d_norm = torch._foreach_norm(copies)
            g_norm = torch._foreach_norm([g.to_dense() if g.is_sparse else g for g in grads])
            dev = w_norm[0].device
            rows = torch.stack([_stack(g_norm, dev), _stack(w_norm, dev), _stack(d_norm, dev)])  # (3, params)
            if self._index is not None:
                index = self._index.to(dev)
                rows = torch.zeros((3, len(self.names)), dtype=torch.float64, device=dev).index_add_(
                    1, index, rows.square()).sqrt()
        with self._lock:
            self._pending.append((step, rows))
            if dev.type == "cpu" or len(self._pending) >= 16:
                self._flush()

    def _flush(self) -> None:
        """Move pending results to the host (caller holds the lock)."""
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        host = torch.stack([r for _, r in self._pending]).cpu().numpy()  # one transfer
        self._pending.clear()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.log10(host[:, 2] / host[:, 1])
        for k, s in enumerate(steps):
            self._steps.append(s)
            self._grad.append(host[k, 0])
            self._weight.append(host[k, 1])
            self._ratio.append(ratio[k])

    # ---- results --------------------------------------------------------------------------------
    def _results(self) -> tuple[list[int], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        with self._lock:
            self._flush()
            return list(self._steps), list(self._grad), list(self._weight), list(self._ratio)

    @property
    def steps(self) -> list[int]:
        """The probed steps."""
        return self._results()[0]

    @property
    def grad_norm(self) -> list[np.ndarray]:
        """Per probed step, the gradient norm of each entry of ``names``."""
        return self._results()[1]

    @property
    def weight_norm(self) -> list[np.ndarray]:
        """Per probed step, the weight norm of each entry of ``names`` before the update."""
        return self._results()[2]

    @property
    def update_ratio(self) -> list[np.ndarray]:
        """Per probed step, ``log10(||dw|| / ||w||)`` of each entry of ``names`` (-inf: no update)."""
        return self._results()[3]

    def as_arrays(self) -> dict[str, Any]:
        """``step`` (n,), ``grad_norm``, ``weight_norm``, ``update_ratio`` (n, layers), ``names``."""
        steps, grad, weight, ratio = self._results()
        width = len(self.names)

        def rows(xs: list[np.ndarray]) -> np.ndarray:
            return np.stack(xs) if xs else np.zeros((0, width))

        return {"step": np.asarray(steps, dtype=np.int64), "names": list(self.names),
                "grad_norm": rows(grad), "weight_norm": rows(weight), "update_ratio": rows(ratio)}

    def truncate(self, step: int) -> None:
        """Forget the records of ``step`` and later (after a roll-back to ``step``)."""
        with self._lock:
            self._flush()
            keep = sum(1 for s in self._steps if s < step)
            del self._steps[keep:], self._grad[keep:], self._weight[keep:], self._ratio[keep:]
        self._armed = -1


_ZERO = torch.zeros(())


def _stack(ts: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """0-d tensors as one float64 vector on ``dev`` (one kernel when they already share a device)."""
    if any(t.device != dev for t in ts):
        ts = [t.to(dev) for t in ts]
    return torch.stack(ts).to(torch.float64)


# ---- early stopping -----------------------------------------------------------------------------------
class EarlyStopping:
    """Stop when the validation loss has not improved by ``min_delta`` for ``patience`` evaluations.

    ``update(val_loss)`` returns True when it is time to stop. ``best`` is the best loss so far
    (``inf`` before the first), ``bad_epochs`` the evaluations since the last improvement. A
    non-finite loss counts as no improvement.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"early stopping patience must be a whole number of 1 or more, not {patience!r}")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ConfigError(f"early stopping min_delta must be 0 or more, not {min_delta!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best = math.inf
        self.best_index: int | None = None
        self.bad_epochs = 0
        self.evaluations = 0

    def update(self, val_loss: float) -> bool:
        """Take one validation loss; True when training should stop now."""
        v = float(val_loss)
        self.evaluations += 1
        if math.isfinite(v) and v < self.best - self.min_delta:
            self.best = v
            self.best_index = self.evaluations - 1
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    @property
    def should_stop(self) -> bool:
        """Whether the last update asked to stop."""
        return self.bad_epochs >= self.patience

    def reset(self) -> None:
        """Forget the history; keep patience and min_delta."""
        self.best = math.inf
        self.best_index = None
        self.bad_epochs = 0
        self.evaluations = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints."""
        return {"patience": self.patience, "min_delta": self.min_delta, "best": self.best,
                "best_index": self.best_index, "bad_epochs": self.bad_epochs, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the patience set here is kept when it differs)."""
        self.min_delta = float(state.get("min_delta", self.min_delta))
        self.best = float(state.get("best", math.inf))
        bi = state.get("best_index")
        self.best_index = None if bi is None else int(bi)
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.evaluations = int(state.get("evaluations", 0))
