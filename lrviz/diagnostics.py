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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

#: The usual healthy update-to-weight ratio per step, on the log10 scale (updates ~1e-3 of the weights).
UPDATE_RATIO_REFERENCE = -3.0

VERDICTS = ("overfitting", "underfitting", "ok", "not enough data")


# ---- the generalization gap ----------------------------------------------------------------------
@dataclass
class GapReport:
    """The generalization gap at each validation point, and a verdict on the recent ones.

    ``steps``, ``train``, ``val`` and ``gap`` are aligned arrays over the validation points that have
    training losses before them: ``train`` is the training loss averaged over the steps just before
    each validation step, ``gap = val - train``. ``verdict`` is one of :data:`VERDICTS`,
    ``explanation`` one line for people, ``details`` the numbers behind the verdict (relative changes
    over the judged window; positive means rising).
    """

    steps: np.ndarray
    train: np.ndarray
    val: np.ndarray
    gap: np.ndarray
    verdict: str
    explanation: str
    details: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists and floats, JSON-friendly; NaN becomes None)."""
        return {
            "steps": [int(s) for s in self.steps],
            "train": _plain_list(self.train),
            "val": _plain_list(self.val),
            "gap": _plain_list(self.gap),
            "verdict": self.verdict,
            "explanation": self.explanation,
            "details": {k: (v if math.isfinite(v) else None) for k, v in self.details.items()},
        }

    def summary(self) -> dict[str, Any]:
        """The run summary's ``generalization`` entry: ``verdict``, ``explanation``, ``points`` (the
        validation points judged) and the gap figures of ``details`` (NaN becomes None), no series."""
        figures = {k: (v if math.isfinite(v) else None) for k, v in self.details.items()}
        return {"verdict": self.verdict, "explanation": self.explanation, "points": int(self.steps.size),
                **figures}


def run_generalization(steps: np.ndarray, losses: np.ndarray, validation: Sequence[Any],
                       has_validation: bool | None = None) -> dict[str, Any]:
    """The ``generalization`` entry of a run's summary from its step columns and validation points
    (objects with ``step`` and ``loss``); says so when the script has no validation data
    (``has_validation`` False) or none was recorded."""
    if not validation and has_validation is False:
        return {"verdict": "not enough data", "points": 0,
                "explanation": "the script's build_data() returns no validation data, so generalization "
                               "cannot be judged (return (train, val) to see it)"}
    if not validation and has_validation is None:
        return {"verdict": "not enough data", "points": 0,
                "explanation": "no validation losses were recorded, so generalization cannot be judged"}
    vs = np.fromiter((p.step for p in validation), dtype=np.int64, count=len(validation))
    vl = np.fromiter((p.loss for p in validation), dtype=np.float64, count=len(validation))
    return generalization(steps, losses, vs, vl).summary()


def generalization(
    train_steps: Sequence[int] | np.ndarray,
    train_loss: Sequence[float] | np.ndarray,
    val_steps: Sequence[int] | np.ndarray,
    val_loss: Sequence[float] | np.ndarray,
    *,
    window: int = 5,
    smooth: int = 25,
    flat_tol: float = 0.03,
    gap_tol: float = 0.05,
    high_fraction: float = 0.5,
    z: float = 3.0,
) -> GapReport:
    """The generalization gap series and a verdict on it.

    The training loss at a validation step is the mean of the (finite) training losses of the last
    ``smooth`` steps up to and including it; ``gap = val - train``. "Now" is the mean of the last
    ``window`` validation points, "then" the mean of the ``window`` points around the lowest
    validation loss. A change counts only when it is also ``z`` times what the noise of that series
    (estimated robustly from its second differences) would give by chance:

    - ``overfitting``: the validation loss stopped falling (its best is older than the last
      ``window`` points, and it is not falling over them) or rose, while the training loss kept
      falling since that best, and the gap is positive and grew by more than ``gap_tol`` of the
      validation loss. A validation loss below the training loss is never overfitting;
    - ``underfitting``: training and validation loss both stayed flat over the last ``window`` points
      (no change beyond ``flat_tol``) while the training loss is still above ``high_fraction`` of
      where it started and the gap is small (under 20% of the validation loss);
    - ``ok``: neither; ``not enough data``: fewer than ``window`` usable validation points.

    Percentages in the explanation are falls of a positive loss, relative to where it fell from,
    so they never exceed 100%; rises are given as the two values.
    """
    if window < 2:
        raise ConfigError(f"window must be at least 2 validation points, not {window}")
    if smooth < 1:
        raise ConfigError(f"smooth must be at least 1 step, not {smooth}")
    ts = np.asarray(train_steps, dtype=np.int64).ravel()
    tl = np.asarray(train_loss, dtype=np.float64).ravel()
    vs = np.asarray(val_steps, dtype=np.int64).ravel()
    vl = np.asarray(val_loss, dtype=np.float64).ravel()
    if ts.shape != tl.shape or vs.shape != vl.shape:
        raise ConfigError("steps and losses must have the same length "
                          f"(train {ts.size} vs {tl.size}, validation {vs.size} vs {vl.size})")
    if ts.size > 1 and not bool(np.all(ts[1:] >= ts[:-1])):  # a run's steps come sorted: no sort then
        order = np.argsort(ts, kind="stable")
        ts, tl = ts[order], tl[order]
    finite = np.isfinite(tl)
    csum = np.concatenate(([0.0], np.cumsum(np.where(finite, tl, 0.0))))
    ccount = np.concatenate(([0], np.cumsum(finite)))
    end = np.searchsorted(ts, vs, side="right")
    start = np.maximum(end - smooth, 0)
    count = ccount[end] - ccount[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        train_at = (csum[end] - csum[start]) / count
    usable = (count > 0) & np.isfinite(vl)
    steps, train_at, val = vs[usable], train_at[usable], vl[usable]
    gap = val - train_at

    have = steps.size
    if have < window:
        return GapReport(steps, train_at, val, gap, "not enough data",
                         f"need {window} validation points with training losses before them to judge, "
                         f"have {have}")
    x = steps[-window:].astype(np.float64)
    tr, va, gp = train_at[-window:], val[-window:], gap[-window:]
    v_level = float(np.mean(np.abs(va))) or 1.0
    t_level = float(np.mean(np.abs(tr))) or 1.0
    d_train = _change(x, tr) / t_level
    d_val = _change(x, va) / v_level
    d_gap = _change(x, gp) / v_level
    # what noise alone would make of a change over the window, relative to the same levels
    xc = x - x.mean()
    amplify = float(x[-1] - x[0]) / math.sqrt(float(np.dot(xc, xc)) or 1.0)
    recent = max(4 * window, 12)
    # the smoothed training loss: the noise of single steps (many, so well estimated) over sqrt(smooth)
    raw = tl[finite & (ts > steps[-min(recent, have)])]
    s_train = _noise(raw) / math.sqrt(max(1.0, float(np.min(count[usable][-window:]))))
    s_val = _noise(val[-recent:])
    n_train = z * amplify * s_train / t_level
    n_val = z * amplify * s_val / v_level
    n_gap = z * amplify * math.hypot(s_train, s_val) / v_level
    first_train = tl[np.flatnonzero(finite)[:smooth]]
    start_level = float(np.mean(first_train)) if first_train.size else float("nan")
    progress = 1.0 - float(tr[-1]) / start_level if start_level > 0 else float("nan")
    rel_gap = float(gp[-1]) / v_level

    # now (the last `window` points) against then (the `window` points around the best validation loss)
    best = int(np.argmin(val))
    lo = min(max(best - window // 2, 0), have - window)
    then = slice(lo, lo + window)
    train_then, val_then, gap_then = (float(np.mean(a[then])) for a in (train_at, val, gap))
    train_now, val_now, gap_now = float(np.mean(tr)), float(np.mean(va)), float(np.mean(gp))
    mean_noise = z * math.sqrt(2.0 / window)  # z times the noise of a difference of two window means
    details = {"train_change": d_train, "val_change": d_val, "gap_change": d_gap,
               "gap": float(gp[-1]), "relative_gap": rel_gap, "progress": progress,
               "best_val_step": float(steps[best]), "best_val": float(val[best]),
               "train_then": train_then, "train_now": train_now, "val_then": val_then, "val_now": val_now,
               "gap_then": gap_then, "gap_now": gap_now}
    last_gap = f"{float(gp[-1]):.3g}"
    span = f"steps {int(x[0])}-{int(x[-1])}"

    val_stalled = best < have - window and d_val > -max(flat_tol, n_val)
    val_rose = val_now - val_then > max(flat_tol * v_level, mean_noise * s_val)
    train_fell = train_now < train_then
    gap_grew = gap_now - gap_then > max(gap_tol * v_level, mean_noise * math.hypot(s_train, s_val))
    if (val_stalled or val_rose) and train_fell and gap_now > 0 and gap_grew:
        since = f"since step {int(steps[best])} (the lowest validation loss, {float(val[best]):.3g})"
        how = (f"the validation loss rose to {val_now:.3g}" if val_rose
               else f"the validation loss stopped improving (about {val_now:.3g})")
        return GapReport(steps, train_at, val, gap, "overfitting",
                         f"{since} the training loss fell from {train_then:.3g} to {train_now:.3g}"
                         f"{_fall(train_then, train_now)} but {how}: the gap grew from {gap_then:.3g} to "
                         f"{gap_now:.3g}; the model is memorizing the training data (stop here or add "
                         "regularization / more data; a decaying LR will not fix it)", details)
    flat = abs(d_train) < max(flat_tol, n_train) and abs(d_val) < max(flat_tol, n_val)
    if flat and progress < 1.0 - high_fraction and abs(rel_gap) < 0.2:
        return GapReport(steps, train_at, val, gap, "underfitting",
                         f"over {span} training and validation loss stayed flat (within {flat_tol:.0%}) "
                         f"at about {float(tr[-1]):.3g} and {float(va[-1]):.3g}, only {max(progress, 0.0):.0%} "
                         "below the start: the model is not learning much (try a higher or a scheduled "
                         "learning rate, a bigger model, or train longer)", details)
    if d_train < -max(flat_tol, n_train):
        state = (f"the training loss is still falling (from {float(tr[0]):.3g} to {float(tr[-1]):.3g}"
                 f"{_fall(float(tr[0]), float(tr[-1]))} over {span})")
        if d_val < -max(flat_tol, n_val):
            state += f" and so is the validation loss (to {float(va[-1]):.3g})"
    else:
        state = "the losses have levelled off"
    if float(gp[-1]) <= 0:
        verdict_text = (f"{state}; the validation loss is below the training loss (gap {last_gap}), "
                        "so the model is not overfitting")
    elif d_gap > max(gap_tol, n_gap):
        verdict_text = (f"{state}; the gap ({last_gap}) is widening, but the validation loss is still "
                        "improving: not overfitting yet (watch it)")
    else:
        verdict_text = f"{state}, and the gap ({last_gap}) is not growing: training generalizes"
    return GapReport(steps, train_at, val, gap, "ok", verdict_text, details)


def _fall(a: float, b: float) -> str:
    """`` (-40%)`` for a fall of a positive loss from ``a`` to ``b``; empty otherwise (never below -100%)."""
    if not (a > 0 and b >= 0 and b < a):
        return ""
    return f" (-{(a - b) / a:.0%})"


def _change(x: np.ndarray, y: np.ndarray) -> float:
    """The change of ``y`` over the span of ``x`` along its least-squares line."""
    xc = x - x.mean()
    denom = float(np.dot(xc, xc))
    if denom == 0.0:
        return float(y[-1] - y[0])
    slope = float(np.dot(xc, y - y.mean())) / denom
    return slope * float(x[-1] - x[0])


def _noise(y: np.ndarray) -> float:
    """The noise of one point of ``y``, from the spread of its second differences (a trend, even a
    bending one, changes them little; iid noise of std s gives them std s * sqrt(6))."""
    d = np.diff(y, 2)
    if d.size < 3:
        return 0.0
    return float(np.median(np.abs(d - np.median(d)))) / 0.6745 / math.sqrt(6.0)


def _plain_list(a: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(a, dtype=np.float64)]


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
