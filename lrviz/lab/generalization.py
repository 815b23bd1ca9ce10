"""The generalization gap and its verdict, with no torch (the app reads it too): :func:`generalization`
compares the validation loss with the (smoothed) training loss at the validation steps and says
whether the run is overfitting, underfitting or fine; :func:`run_generalization` is the run
summary's ``generalization`` entry. :mod:`lrviz.lab.diagnostics` re-exports all of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError

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
