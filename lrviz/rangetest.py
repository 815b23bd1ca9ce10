"""The learning-rate range test: sweep the rate up exponentially, watch the loss, suggest a rate.

:func:`range_test` trains ``model`` for up to ``steps`` optimizer steps while the learning rate
grows from ``start`` to ``end`` (``lr_i = start * (end / start) ** (i / (steps - 1))``), records
each batch's loss and its debiased exponential moving average, and stops early once the smoothed
loss exceeds ``stop_factor`` times its best or the loss is not finite. Whatever happens (a finished
sweep, an early stop, a cancel, an exception in the user's code) the model's parameters, buffers
and gradients, the optimizer's state and param groups, the modules' train/eval modes and the random
number generators (Python, NumPy, torch CPU, CUDA/MPS when present) are put back bit for bit, so
the sweep can run mid-training from the current weights.

:func:`suggest` reads a curve (``lrs``, raw ``losses``) and returns several suggestions at once
(:class:`Suggestions`): ``steepest``, ``valley`` and ``minimum_tenth``, judged on the part of the
smoothed curve that fastai's ``lr_find`` judges; ``valley`` and ``minimum_tenth`` are fastai's
``valley`` and ``minimum`` (``fastai/callback/schedule.py``) and equal them for the same curve. When the curve is too short
or never falls, every suggestion is ``None`` and ``reason`` says why: it never guesses.

:func:`find_lr` is the headless entry point (``lrviz find-lr``): it builds model, data and
optimizer from an experiment exactly as :class:`lrviz.engine.TrainingEngine` does and runs the test.

This module never imports Qt and never prints; progress goes through ``on_step``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .devices import to_device
from .errors import ConfigError, LrvizError, ScriptError

__all__ = [
    "CONFIRM_STEPS",
    "METHODS",
    "MIN_POINTS",
    "TRIM_END",
    "Confirmation",
    "RangeTestProgress",
    "RangeTestResult",
    "Suggestions",
    "Trial",
    "adopt",
    "candidates",
    "confirm_cost",
    "confirm_experiment",
    "confirm_rates",
    "find_lr",
    "held_out",
    "loss_axis_range",
    "min_steps",
    "range_test",
    "smooth",
    "suggest",
    "valley_index",
    "write_csv",
]

log = logging.getLogger(__name__)

#: The suggestion methods, in the order they are shown.
METHODS = ("steepest", "valley", "minimum_tenth")
#: Fewer points to judge than this (after fastai's trim, see :func:`suggest`) and no suggestion is made.
MIN_POINTS = 10
#: fastai's ``lr_find`` judges the curve without its last points (the blow-up).
TRIM_END = 5
#: The batch losses must fall by more than chance (see :func:`_fall_beyond_noise`) for a suggestion.
FALL_Z = 1.5
MIN_WINDOW = 3
#: Steps each candidate rate trains for in a confirmation (``--confirm-steps``).
CONFIRM_STEPS = 20
#: Candidate rates of a confirmation: at most this many, and neighbours at most this factor apart.
MAX_CANDIDATES = 4
CANDIDATE_RATIO = 10 ** 0.5

LossOf = Callable[[torch.nn.Module, Any], torch.Tensor]


# --------------------------------------------------------------------------- results


@dataclass
class Suggestions:
    """Learning rates suggested by several methods on one range-test curve.

    ``steepest``: where the smoothed loss falls fastest against log(lr), before its minimum.
    ``valley``: fastai's ``valley``: a rate about half-way along the longest descent.
    ``minimum_tenth``: a tenth of the rate at the lowest smoothed loss (fastai's ``minimum``).
    ``confirmed``: the rate a confirmation (:func:`confirm`) found to lower the loss most, or None.
    ``chosen`` names the method whose value is "the" suggestion (:attr:`best`): one of
    :data:`METHODS`, or ``"confirmed"``. When the curve cannot be judged, every value is None and
    ``reason`` says why in words.
    """

    steepest: float | None
    valley: float | None
    minimum_tenth: float | None
    chosen: str = "valley"
    reason: str | None = None
    confirmed: float | None = None

    @property
    def best(self) -> float | None:
        """The chosen method's suggestion (None when there is none)."""
        return getattr(self, self.chosen)

    def values(self) -> dict[str, float | None]:
        """Each method's suggestion by name, in :data:`METHODS` order."""
        return {m: getattr(self, m) for m in METHODS}

    def band(self) -> tuple[float, float] | None:
        """The lowest and highest of the suggestions made (None when none was made)."""
        made = [v for v in self.values().values() if v is not None]
        return (min(made), max(made)) if made else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: every method's value, ``confirmed``, ``chosen``, ``best`` and ``reason``."""
        return {**self.values(), "confirmed": self.confirmed, "chosen": self.chosen, "best": self.best,
                "reason": self.reason}


@dataclass
class Trial:
    """One candidate rate of a confirmation, trained from the same weights on the same batches.

    ``losses`` holds the loss of each step trained (it ends early at a non-finite loss or one
    above ``stop_factor`` times the first: ``diverged``). ``start`` is the mean loss of the
    starting weights on the held-out batches (the same for every trial), ``end`` that of the
    weights after training (inf when diverged); the trial with the lowest ``end`` lowered the
    loss most.
    """

    lr: float
    source: str
    losses: np.ndarray
    diverged: bool
    start: float = math.nan
    end: float = math.inf
    #: The loss of the trained weights on each held-out batch (empty when diverged).
    held: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def describe(self) -> str:
        """``0.0123 (valley): 2.3 -> 0.412`` or ``0.5: diverged at step 7``."""
        name = f"{_fmt(self.lr)}" + (f" ({_SOURCE_NAMES.get(self.source, self.source)})" if self.source else "")
        if self.diverged:
            return f"{name}: diverged at step {len(self.losses) - 1}"
        return f"{name}: {self.start:.3g} -> {self.end:.3g}"

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "source": self.source, "diverged": self.diverged,
                "start": _finite_or_none(self.start), "end": _finite_or_none(self.end),
                "losses": [_finite_or_none(v) for v in self.losses.tolist()]}


@dataclass
class Confirmation:
    """Several candidate rates, each trained ``steps`` steps from the same weights on the same
    batches; ``winner`` lowered the loss most (None when none lowered it), ``reason`` says which
    and why in one line."""

    trials: list[Trial]
    steps: int
    winner: Trial | None
    reason: str
    seconds: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "winner": None if self.winner is None else self.winner.lr,
                "winner_source": None if self.winner is None else self.winner.source,
                "reason": self.reason, "seconds": self.seconds, "trials": [t.to_dict() for t in self.trials]}


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


_SOURCE_NAMES = {"steepest": "steepest", "valley": "valley", "minimum_tenth": "min/10", "between": "between"}


@dataclass
class RangeTestResult:
    """One range test: per step done, the rate used, the batch's loss and the smoothed loss."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    stopped_early: bool
    #: Why the sweep ended before ``steps`` (e.g. "smoothed loss exceeded 4x its best at lr 0.31");
    #: empty when it ran every step.
    stop_reason: str
    suggestions: Suggestions
    #: The sweep that was asked for.
    start: float = math.nan
    end: float = math.nan
    steps: int = 0
    beta: float = 0.98
    stop_factor: float = 4.0
    seconds: float = math.nan
    #: The confirmation of the suggestions (None when it did not run; ``confirm_note`` says why).
    confirmation: Confirmation | None = None
    confirm_note: str = ""

    def __len__(self) -> int:
        return len(self.lrs)

    def to_rows(self) -> list[dict[str, float]]:
        """One dict per step: ``lr``, ``loss``, ``smoothed`` (for CSV)."""
        return [
            {"lr": float(a), "loss": float(b), "smoothed": float(c)}
            for a, b, c in zip(self.lrs.tolist(), self.losses.tolist(), self.smoothed.tolist())
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (without the per-step rows): the sweep, how it ended, suggestions."""
        return {
            "start": self.start, "end": self.end, "steps": self.steps, "steps_done": len(self),
            "beta": self.beta, "stop_factor": self.stop_factor, "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason, "seconds": self.seconds,
            "suggestions": self.suggestions.to_dict(),
            "confirmation": None if self.confirmation is None else self.confirmation.to_dict(),
            "confirm_note": self.confirm_note,
        }


class RangeTestProgress:
    """The curve of a running range test, for another thread to poll (pass :meth:`record` as ``on_step``).

    Preallocated arrays written by the test's thread; ``n`` (the number of steps recorded) is
    updated last, so :meth:`view` never shows a half-written row. No callbacks, no locks.
    """

    def __init__(self, steps: int, beta: float = 0.98):
        self.steps = int(steps)
        self.beta = _check_beta(beta)
        self.lrs = np.full(self.steps, np.nan)
        self.losses = np.full(self.steps, np.nan)
        self.smoothed = np.full(self.steps, np.nan)
        self.n = 0
        self._avg = 0.0
        self._bpow = 1.0

    def record(self, i: int, lr: float, loss: float) -> None:
        """Store step ``i`` (the ``on_step`` signature of :func:`range_test`)."""
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        self._bpow *= self.beta
        self.lrs[i], self.losses[i], self.smoothed[i] = lr, loss, self._avg / (1 - self._bpow)
        self.n = i + 1

    def view(self) -> dict[str, np.ndarray]:
        """Read-only views of the rows recorded so far: ``lr``, ``loss``, ``smoothed``."""
        n = self.n
        out = {"lr": self.lrs[:n], "loss": self.losses[:n], "smoothed": self.smoothed[:n]}
        for v in out.values():
            v.flags.writeable = False
        return out


# --------------------------------------------------------------------------- argument checks


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a finite number > 0, not {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a finite number > 0, not {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, not {value!r}")
    return v


def _check_beta(beta: Any) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ConfigError(f"smoothing beta must be a number in [0, 1), not {beta!r}") from None
    if isinstance(beta, bool) or not 0 <= b < 1:
        raise ConfigError(f"smoothing beta must be a number in [0, 1) (0.98 is usual), not {beta!r}")
    return b


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ConfigError(f"unknown suggestion method {method!r}; choose one of {', '.join(METHODS)}")
    return str(method)


def _check_sweep(start: Any, end: Any, steps: Any, beta: Any, stop_factor: Any, method: Any
                 ) -> tuple[float, float, int, float, float, str]:
    """Validate every range-test setting up front; ConfigError names the one that is wrong."""
    s = _positive(start, "range test start lr")
    e = _positive(end, "range test end lr")
    if e <= s:
        raise ConfigError(f"range test end lr ({end!r}) must be greater than its start lr ({start!r})")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or int(steps) < 2:
        raise ConfigError(f"range test steps must be a whole number >= 2, not {steps!r}")
    b = _check_beta(beta)
    try:
        f = float(stop_factor)
    except (TypeError, ValueError):
        raise ConfigError(f"stop factor must be a number > 1, not {stop_factor!r}") from None
    if isinstance(stop_factor, bool) or not f > 1:  # also rejects NaN
        raise ConfigError(f"stop factor must be a number > 1 (4 is usual), not {stop_factor!r}")
    return s, e, int(steps), b, f, _check_method(method)


# --------------------------------------------------------------------------- suggestions


def smooth(losses: Sequence[float] | np.ndarray, beta: float = 0.98) -> np.ndarray:
    """Debiased exponential moving average: ``avg = beta*avg + (1-beta)*x; avg / (1 - beta**(i+1))``.

    A non-finite value makes it, and every value after it, non-finite (as in the range test).
    """
    x = np.asarray(losses, dtype=np.float64)
    out = np.empty_like(x)
    avg = 0.0
    bpow = 1.0
    for i, v in enumerate(x.tolist()):
        avg = beta * avg + (1 - beta) * v
        bpow *= beta
        out[i] = avg / (1 - bpow)
    return out


def min_steps(num_it: int) -> int:
    """The fewest steps of a sweep of ``num_it`` that leave :data:`MIN_POINTS` to judge."""
    return int(num_it) // 10 + MIN_POINTS + TRIM_END


def valley_index(y: Sequence[float] | np.ndarray) -> int:
    """fastai's ``valley`` rule: the index of its suggestion in the (smoothed) curve ``y``.

    ``L`` is the length of the longest strictly decreasing subsequence of ``y`` and ``end`` the
    first index where a decreasing subsequence reaches that length; the suggestion is at
    ``end - L + L // 3 + L // 6``: about half-way back along the valley, counted in points from
    its end (fastai's ``max_start + int(sections) + int(sections / 2)`` with ``max_start = end - L``
    and ``sections = L / 3``); 0 when nothing falls. It is -1 when the longest descent is 2 points
    long and ends at index 1 (fastai then takes the last point; :func:`suggest` does not suggest).
    """
    v = np.asarray(y, dtype=np.float64)
    n = len(v)
    if n == 0:
        raise ConfigError("valley_index needs at least one point")
    length = np.ones(n, dtype=np.int64)
    for i in range(1, n):
        higher = v[:i] > v[i]
        if higher.any():
            length[i] = int(length[:i][higher].max()) + 1
    longest = int(length.max())
    if longest == 1:  # nothing falls: fastai never moves its start from 0
        return 0
    end = int(np.argmax(length))  # the first index that reaches it
    return end - longest + longest // 3 + longest // 6


def _fall_beyond_noise(raw: np.ndarray) -> tuple[float, float]:
    """How far the batch losses fell, and how far chance alone would make them seem to fall.

    The fall is the mean of the first window of ``k`` losses (k a fifth of them, at least
    :data:`MIN_WINDOW`) minus the lowest mean of any later window; chance is the noise of one loss
    (from successive differences, so a trend does not count) times sqrt(2 / k), times
    ``FALL_Z + sqrt(2 ln M)`` for the M windows the lowest was picked from.
    """
    n = raw.size
    k = max(MIN_WINDOW, n // 5)
    if n < k + 1:
        return 0.0, 0.0
    c = np.concatenate(([0.0], np.cumsum(raw)))
    means = (c[k:] - c[:-k]) / k
    fell = float(means[0] - means.min())
    d = np.diff(raw)
    sigma = float(np.median(np.abs(d - np.median(d)))) / 0.6745 / math.sqrt(2.0)
    windows = max(1.0, n / k)
    return fell, sigma * math.sqrt(2.0 / k) * (FALL_Z + math.sqrt(2.0 * math.log(windows)))


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def suggest(
    lrs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    beta: float = 0.98,
    method: str = "valley",
    num_it: int | None = None,
) -> Suggestions:
    """Suggest learning rates from a range-test curve of raw losses (smoothed here with ``beta``).

    The curve is read the way fastai's ``lr_find`` reads its recorder: the smoothed loss from
    point ``num_it // 10`` (``num_it``: the steps the sweep was asked for, default all of them) to
    the 5th point from the end, and up to the first non-finite value in that part. On it:

    - ``steepest``: the rate where d(smoothed loss)/d(log10 lr) (central differences) is most
      negative before the lowest point (lrviz's own; fastai's ``steep`` also looks past the minimum);
    - ``valley``: fastai's ``valley`` (:func:`valley_index`);
    - ``minimum_tenth``: fastai's ``minimum``, the rate at the lowest smoothed loss divided by 10.

    Where fastai would still answer, lrviz does not guess: with fewer than :data:`MIN_POINTS`
    points to judge, rates that do not increase, or a loss whose lowest point is at the start of
    that part (it never fell), every suggestion is None and ``reason`` says why.
    ``beta=0`` judges the raw curve.
    """
    b = _check_beta(beta)
    chosen = _check_method(method)
    x = np.asarray(lrs, dtype=np.float64).ravel()
    y = np.asarray(losses, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ConfigError(f"suggest needs as many learning rates as losses, not {x.size} and {y.size}")
    total = x.size if num_it is None else int(num_it)

    def none(reason: str) -> Suggestions:
        return Suggestions(None, None, None, chosen, reason)

    if x.size == 0:
        return none("no losses recorded")
    bad = ~(np.isfinite(y) & np.isfinite(x) & (x > 0))
    if bad.all():
        return none("no finite losses")
    cut = int(np.argmax(bad)) if bad.any() else x.size  # the curve ends at its first non-finite point
    lo = total // 10
    judged = slice(lo, min(cut, x.size - TRIM_END))
    n = max(0, judged.stop - judged.start)
    if n < MIN_POINTS:
        if cut < x.size and cut < lo + MIN_POINTS + TRIM_END:
            return none(f"the loss diverged after only {cut} step{'s' if cut != 1 else ''}; lower --start")
        return none(f"only {n} point{'s' if n != 1 else ''} to judge after skipping the first tenth and the "
                    f"last {TRIM_END} (as fastai does); at least {MIN_POINTS} are needed (raise --steps)")
    if np.any(np.diff(x[:cut]) <= 0):
        return none("the learning rate does not increase from step to step, so this is not a "
                    "range-test curve")
    s = smooth(y[:cut], b)[judged]
    raw = y[judged]
    x = x[judged]
    m = int(np.argmin(s))
    if m < 2:
        return none(f"the loss never fell: its lowest point is at lr {_fmt(x[m])}, at the start of the "
                    "sweep; lower --start")
    fell, needed = _fall_beyond_noise(raw[: m + 1] if m + 1 >= 2 * MIN_WINDOW else raw)
    if fell <= needed:
        return none(f"the loss never fell by more than its noise (by {fell:.2g} in batch losses, chance alone "
                    f"makes up to {needed:.2g}) before lr {_fmt(x[-1])}; raise --end or --steps")
    steepest = float(x[int(np.argmin(np.gradient(s, np.log10(x))[:m]))])
    k = valley_index(s)
    if k < 0:
        return none("the loss has no steady descent to judge (its longest fall is 2 points); raise --steps")
    return Suggestions(steepest, float(x[k]), float(x[m]) / 10, chosen, None)


def loss_axis_range(losses: Sequence[float] | np.ndarray, smoothed: Sequence[float] | np.ndarray,
                    pad: float = 0.06) -> tuple[float, float] | None:
    """The loss range a plot of the curve shows: the curve up to its lowest smoothed point (the
    smoothed loss, and the batch losses between their 2nd and 98th percentile there), padded by
    ``pad`` of the span. The fall of the loss fills the height; the blow-up after the minimum
    leaves at the top. None when there is nothing finite to show."""
    raw = np.asarray(losses, dtype=np.float64)
    sm = np.asarray(smoothed, dtype=np.float64)
    ok = np.isfinite(sm)
    if not ok.any():
        return None
    m = int(np.flatnonzero(ok)[np.argmin(sm[ok])])
    part = slice(0, m + 1) if m >= 3 else slice(0, len(sm))  # a curve that never fell: all of it
    s_part = sm[part][np.isfinite(sm[part])]
    r_part = raw[part][np.isfinite(raw[part])]
    lo, hi = float(s_part.min()), float(s_part.max())
    if r_part.size:
        lo = min(lo, float(np.quantile(r_part, 0.02)))
        hi = max(hi, float(np.quantile(r_part, 0.98)))
    if not hi > lo:
        hi = lo + max(abs(lo), 1.0) * 0.1
    margin = pad * (hi - lo)
    return lo - margin, hi + margin


# --------------------------------------------------------------------------- saving and restoring


class _Snapshot:
    """Everything a range test changes, saved bit for bit and put back by :meth:`restore`.

    The model's parameters, buffers (persistent or not) and gradients are restored into the very
    tensor objects they were (the optimizer and anything else holding them keep working), each
    module's ``training`` flag, the optimizer's per-parameter state and param-group settings, and
    the random number generators: the global ones and those of ``data`` (a DataLoader's own
    ``generator=`` and its sampler's), which iterating it draws from.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Any = None):
        self.model = model
        self.optimizer = optimizer
        self.data_rngs = [(g, g.get_state()) for g in _generators_of(data)]
        self.modes = [(m, m.training) for m in model.modules()]
        # (slot dict, name, the tensor object, a copy of its values, its grad object, a copy of the grad)
        self.slots: list[tuple[dict[str, Any], str, Any, Any, Any, Any]] = []
        seen: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for m in model.modules():
                for slots in (m._parameters, m._buffers):
                    for name, t in slots.items():
                        if t is None:
                            self.slots.append((slots, name, None, None, None, None))
                            continue
                        if id(t) in seen:  # tied weights: save once, restore the slot's identity
                            self.slots.append((slots, name, t, None, None, None))
                            continue
                        seen[id(t)] = t
                        g = t.grad if isinstance(t, torch.nn.Parameter) else None
                        self.slots.append((slots, name, t, t.detach().clone(), g,
                                           None if g is None else g.detach().clone()))
        self.extra_params = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in seen]
        self.extra = [(p, p.detach().clone(), p.grad, None if p.grad is None else p.grad.detach().clone())
                      for p in {id(p): p for p in self.extra_params}.values()]
        # Optimizer: per-parameter state (deep copies, one call so aliasing is kept) and group settings.
        keys = list(optimizer.state.keys())
        self.state_keys = keys
        self.state_values = copy.deepcopy([optimizer.state[k] for k in keys])
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                       for g in optimizer.param_groups]
        self.group_params = [g["params"] for g in optimizer.param_groups]
        # Random number generators.
        self.py_rng = random.getstate()
        self.np_rng = np.random.get_state()
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        mps = getattr(torch, "mps", None)
        mps_backend = getattr(torch.backends, "mps", None)
        self.mps_rng = (mps.get_rng_state() if mps is not None and mps_backend is not None
                        and mps_backend.is_available() else None)

    def restore(self) -> None:
        with torch.no_grad():
            for slots, name, t, values, g, gvalues in self.slots:
                slots[name] = t
                if values is not None:
                    t.copy_(values)
                if isinstance(t, torch.nn.Parameter) and values is not None:
                    self._restore_grad(t, g, gvalues)
            for p, values, g, gvalues in self.extra:
                p.copy_(values)
                self._restore_grad(p, g, gvalues)
        for m, training in self.modes:
            m.training = training
        opt = self.optimizer
        opt.state.clear()
        # copies: the optimizer updates its state in place, and a snapshot may be restored again
        for k, v in zip(self.state_keys, copy.deepcopy(self.state_values)):
            opt.state[k] = v
        for group, saved, params in zip(opt.param_groups, self.groups, self.group_params):
            group.clear()
            group["params"] = params
            group.update(copy.deepcopy(saved))
        for g, state in self.data_rngs:
            g.set_state(state)
        self.restore_rng()

    def restore_rng(self) -> None:
        """Put back only the random number generators."""
        random.setstate(self.py_rng)
        np.random.set_state(self.np_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if self.mps_rng is not None:
            torch.mps.set_rng_state(self.mps_rng)

    @staticmethod
    def _restore_grad(p: torch.Tensor, g: torch.Tensor | None, gvalues: torch.Tensor | None) -> None:
        if g is None:
            p.grad = None
            return
        g.copy_(gvalues)
        if p.grad is not g:
            p.grad = g


def _generators_of(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that iterating ``data`` draws from: its own ``generator``
    and those of its ``sampler`` and ``batch_sampler`` (a DataLoader's), looked for a few levels
    deep (also inside lrviz's wrapper of a script's data)."""
    found: dict[int, torch.Generator] = {}
    level = [data]
    for _ in range(4):
        nxt = []
        for obj in level:
            if obj is None:
                continue
            g = getattr(obj, "generator", None)
            if isinstance(g, torch.Generator):
                found[id(g)] = g
            for name in ("sampler", "batch_sampler", "data"):
                sub = getattr(obj, name, None) if not isinstance(obj, torch.Tensor) else None
                if sub is not None and not isinstance(sub, (torch.Tensor, np.ndarray)):
                    nxt.append(sub)
        level = nxt
    return list(found.values())


# --------------------------------------------------------------------------- the sweep


def _batches_forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield batches, iterating ``batches`` again (a new epoch) whenever it is exhausted."""
    epoch = 0
    while True:
        got = False
        for batch in batches:
            got = True
            yield batch
        epoch += 1
        if not got:
            hint = (" (was it a one-shot iterator? pass a list or a DataLoader, which can be iterated "
                    "every epoch)") if epoch > 1 else ""
            raise ConfigError(f"the range test's data yielded no batches in epoch {epoch}{hint}")


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        cur = g["lr"]
        if isinstance(cur, torch.Tensor):
            cur.fill_(lr)
        else:
            g["lr"] = lr


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(f"the loss function returned {type(loss).__name__}; it must return a scalar tensor")
    if loss.numel() != 1:
        raise ConfigError(f"the loss function returned a tensor of shape {list(loss.shape)}; it must return "
                          "a scalar (reduce it with .mean())")
    if not loss.requires_grad:
        raise ConfigError("the loss function returned a tensor that does not require grad; compute it from "
                          "the model's output without .detach() or torch.no_grad()")


def range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_of: LossOf,
    *,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    stop_factor: float = 4.0,
    device: torch.device | str | None = None,
    should_stop: Callable[[], bool] | None = lambda: False,
    on_step: Callable[[int, float, float], Any] | None = None,
    method: str = "valley",
    confirm: bool | None = False,
    confirm_steps: int = CONFIRM_STEPS,
    on_confirm_step: Callable[[int, int, float, float], Any] | None = None,
) -> RangeTestResult:
    """Sweep the learning rate from ``start`` to ``end`` exponentially over ``steps`` optimizer steps.

    Each step sets every param group's lr, computes ``loss_of(model, batch)`` (batches moved to
    ``device`` when it is not the CPU), records the loss, and (when it is finite) steps the
    optimizer. ``batches`` is iterated again whenever it runs out. The sweep stops early when the
    smoothed loss exceeds ``stop_factor`` times its best (for a negative best: rises by
    ``stop_factor - 1`` times its magnitude), when the loss is not finite, or when
    ``should_stop()`` (polled before every step) returns True. ``on_step(i, lr, loss)`` is
    called after every step. The model runs in train mode.

    Then, when there are suggestions and ``confirm`` is True (or None, "auto", and the
    confirmation costs fewer steps than the sweep took), :func:`confirm_rates` trains the
    :func:`candidates` from the same weights for ``confirm_steps`` steps each; the rate that
    lowered the loss most becomes ``suggestions.confirmed`` and the chosen suggestion.
    ``on_confirm_step(trial, i, lr, loss)`` follows it. ``confirm_note`` says why it did not run.

    Model, optimizer and random number generators are restored exactly afterwards (in a
    ``finally:``, so also when ``loss_of`` raises; the exception then propagates). Bad settings
    raise :class:`ConfigError` before anything runs. One host sync per step reads the loss (the
    early stop needs it).
    """
    start, end, steps, beta, stop_factor, method = _check_sweep(start, end, steps, beta, stop_factor, method)
    confirm_steps = _check_confirm_steps(confirm_steps)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"range test needs a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"range test needs a torch.optim.Optimizer, not {type(optimizer).__name__}")
    if not isinstance(batches, Iterable):  # not iter(): creating a DataLoader iterator draws from the RNG
        raise ConfigError(f"range test data of type {type(batches).__name__} cannot be iterated")
    dev = torch.device(device) if device is not None else None
    move = dev is not None and dev.type != "cpu"
    plan = start * (end / start) ** (np.arange(steps) / (steps - 1))
    lrs = np.full(steps, np.nan)
    losses = np.full(steps, np.nan)
    smoothed = np.full(steps, np.nan)
    stop_reason = ""
    done = 0
    avg = 0.0
    bpow = 1.0
    best = math.inf
    t0 = time.perf_counter()
    snapshot = _Snapshot(model, optimizer, batches)
    try:
        model.train()
        data = _batches_forever(batches)
        with torch.enable_grad():
            for i in range(steps):
                if should_stop is not None and should_stop():
                    stop_reason = f"cancelled after {i} of {steps} steps"
                    break
                lr = float(plan[i])
                _set_lr(optimizer, lr)
                batch = next(data)
                if move:
                    batch = to_device(batch, dev)
                model.zero_grad(set_to_none=True)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(model, batch)
                if i == 0:
                    _check_loss(loss)
                value = float(loss.detach())
                avg = beta * avg + (1 - beta) * value
                bpow *= beta
                sm = avg / (1 - bpow)
                lrs[i], losses[i], smoothed[i] = lr, value, sm
                done = i + 1
                if not math.isfinite(value):
                    stop_reason = f"the loss became {value} at lr {_fmt(lr)}"
                elif sm < best:
                    best = sm
                elif sm > best + (stop_factor - 1) * abs(best):
                    stop_reason = f"smoothed loss exceeded {stop_factor:g}x its best at lr {_fmt(lr)}"
                if not stop_reason:
                    loss.backward()
                    optimizer.step()
                del loss
                if on_step is not None:
                    on_step(i, lr, value)
                if stop_reason:
                    break
        # Drop the graph and grads of the last step before the restore puts the originals back.
        model.zero_grad(set_to_none=True)
    finally:
        snapshot.restore()
    seconds = time.perf_counter() - t0
    lrs, losses, smoothed = lrs[:done], losses[:done], smoothed[:done]
    sugg = suggest(lrs, losses, beta=beta, method=method, num_it=steps)
    n_finite = int(np.isfinite(losses).sum())
    if sugg.reason is not None:
        too_short = sugg.reason.startswith(("only ", "the loss diverged after only"))
        plural = "s" if done != 1 else ""
        if done == 0:
            sugg.reason = "cancelled before the first step"
        elif n_finite == 0:
            sugg.reason = (f"no finite losses: the loss was {losses[0]} from the first step (lr {_fmt(start)}); "
                           "check the model and the data, or lower --start")
        elif too_short and stop_reason.startswith("cancelled"):
            sugg.reason = (f"cancelled after only {done} step{plural}; at least {min_steps(steps)} of "
                           f"{steps} are needed")
        elif too_short and stop_reason:
            sugg.reason = (f"the loss diverged after only {done} step{plural} (at lr {_fmt(float(lrs[-1]))}); "
                           "lower --start")
    log.debug("range test: %d steps in %.3fs; %s; suggestions %s", done, seconds,
              stop_reason or "all steps done", sugg.to_dict())
    result = RangeTestResult(lrs, losses, smoothed, bool(stop_reason), stop_reason, sugg, start=start, end=end,
                             steps=steps, beta=beta, stop_factor=stop_factor, seconds=seconds)
    if confirm is False or sugg.reason is not None or stop_reason.startswith("cancelled"):
        return result
    cands = candidates(sugg)
    cost = confirm_cost(len(cands), confirm_steps)
    if confirm is None and cost >= done:
        result.confirm_note = (f"not confirmed: {len(cands)} rates x {confirm_steps} steps would cost about "
                               f"{cost:.0f} steps, more than the range test's {done} (ask for it with --confirm)")
        return result
    result.confirmation = confirm_rates(model, optimizer, batches, loss_of, cands, steps=confirm_steps,
                                        stop_factor=stop_factor, device=device, should_stop=should_stop,
                                        on_step=on_confirm_step)
    adopt(result)
    return result


def adopt(result: RangeTestResult) -> None:
    """Make the winner of ``result.confirmation`` the chosen suggestion (when it has one)."""
    c = result.confirmation
    if c is not None and c.winner is not None:
        result.suggestions.confirmed = c.winner.lr
        result.suggestions.chosen = "confirmed"


# --------------------------------------------------------------------------- confirmation


def _check_confirm_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or int(steps) < 2:
        raise ConfigError(f"confirmation steps must be a whole number >= 2 ({CONFIRM_STEPS} is usual), "
                          f"not {steps!r}")
    return int(steps)


def candidates(s: Suggestions, max_count: int = MAX_CANDIDATES,
               ratio: float = CANDIDATE_RATIO) -> list[tuple[float, str]]:
    """The rates a confirmation tries, lowest first, each with where it came from.

    Every suggestion made, none above ``minimum_tenth`` (a tenth of the rate at the lowest loss:
    above it the sweep's loss is close to blowing up, and a rate that wins a short trial there
    often stalls or diverges later; a suggestion above it is tried at it, under its name), rates within 10% of
    each other once, named after the first in :data:`METHODS` order; then rates in the widest
    gaps between neighbours (log-midpoints, ``"between"``) while a gap is wider than ``ratio`` and
    there are fewer than ``max_count``. A band of one rate gets that rate / ``ratio`` too
    (``"below"``). Empty when there is no suggestion.
    """
    if s.minimum_tenth is None:
        return []
    top = float(s.minimum_tenth)
    made: list[tuple[float, str]] = []
    for m in METHODS:
        v = getattr(s, m)
        if v is None:
            continue
        if v > top:
            v, m = top, "minimum_tenth"
        if all(abs(math.log(v / w)) > math.log(1.1) for w, _ in made):
            made.append((float(v), m))
    if len(made) == 1:
        made.append((made[0][0] / ratio, "below"))
    made.sort()
    while len(made) < max_count:
        gaps = [math.log(b[0] / a[0]) for a, b in zip(made, made[1:])]
        k = int(np.argmax(gaps))
        if gaps[k] <= math.log(ratio) * (1 + 1e-9):
            break
        made.insert(k + 1, (math.sqrt(made[k][0] * made[k + 1][0]), "between"))
    return made


def confirm_rates(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_of: LossOf,
    rates: Sequence[tuple[float, str]] | Sequence[float],
    *,
    steps: int = CONFIRM_STEPS,
    stop_factor: float = 4.0,
    device: torch.device | str | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, float, float], Any] | None = None,
) -> Confirmation:
    """Train each rate of ``rates`` for ``steps`` steps from the same weights on the same batches;
    the one whose loss fell most wins.

    The first ``steps`` batches of ``batches`` are taken once, and :func:`held_out` more after
    them; before each rate, model, optimizer and random number generators are put back as they
    were, so every rate starts from the same point and sees the same batches (and the same
    dropout). A rate whose loss turns non-finite or exceeds ``stop_factor`` times its first loss
    has diverged. After its steps, each rate's weights are measured on the held-out batches (train
    mode, no gradients, the same random numbers for every rate): the winner has the lowest mean
    loss there, and only when that is below the starting weights' own. Afterwards everything is
    restored exactly, as after :func:`range_test`. ``on_step(trial, i, lr, loss)`` follows the
    steps; ``should_stop()`` ends it early (no winner).
    """
    steps = _check_confirm_steps(steps)
    pairs = [(r, "") if not isinstance(r, tuple) else r for r in rates]
    if not pairs:
        raise ConfigError("no learning rates to confirm")
    pairs = [(_positive(lr, "learning rate to confirm"), str(src)) for lr, src in pairs]
    dev = torch.device(device) if device is not None else None
    move = dev is not None and dev.type != "cpu"
    trials: list[Trial] = []
    cancelled = False
    t0 = time.perf_counter()
    snapshot = _Snapshot(model, optimizer, batches)

    def measure() -> np.ndarray:
        snapshot.restore_rng()  # the same dropout for every rate
        with torch.no_grad():
            return np.array([float(loss_of(model, to_device(b, dev) if move else b).detach()) for b in probe])

    try:
        data = _batches_forever(batches)
        fixed = [next(data) for _ in range(steps + held_out(steps))]
        data.close()
        fixed, probe = fixed[:steps], fixed[steps:]
        model.train()
        start = float(np.mean(measure()))
        for k, (lr, source) in enumerate(pairs):
            if should_stop is not None and should_stop():
                cancelled = True
                break
            snapshot.restore()
            model.train()
            _set_lr(optimizer, lr)
            values: list[float] = []
            diverged = False
            with torch.enable_grad():
                for i, batch in enumerate(fixed):
                    if i and should_stop is not None and should_stop():
                        cancelled = True
                        break
                    model.zero_grad(set_to_none=True)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_of(model, to_device(batch, dev) if move else batch)
                    if i == 0:
                        _check_loss(loss)
                    value = float(loss.detach())
                    values.append(value)
                    if on_step is not None:
                        on_step(k, i, lr, value)
                    first = values[0]
                    if not math.isfinite(value) or (i and value > first + (stop_factor - 1) * abs(first)):
                        diverged = True
                        break
                    loss.backward()
                    optimizer.step()
                    del loss
            if cancelled:
                break
            held = np.zeros(0) if diverged else measure()
            end = float(np.mean(held)) if held.size else math.inf
            trials.append(Trial(lr, source, np.array(values, dtype=np.float64), diverged or not math.isfinite(end),
                                start, end, held))
        model.zero_grad(set_to_none=True)
    finally:
        snapshot.restore()
    seconds = time.perf_counter() - t0
    winner, reason = _judge(trials, steps, len(pairs), cancelled)
    log.debug("confirmation: %s (%.3fs)", reason, seconds)
    return Confirmation(trials, steps, winner, reason, seconds)


def _judge(trials: list[Trial], steps: int, asked: int, cancelled: bool) -> tuple[Trial | None, str]:
    """The rate that lowered the loss most, and one line saying why.

    Rates whose held-out loss is not worse than the lowest by more than twice the standard error of
    the paired differences (batch by batch) are a tie; of a tie the highest rate wins: a short
    trial favours low rates (its gain from less noise comes at once, a higher rate's later).
    """
    if cancelled:
        return None, f"cancelled after {len(trials)} of {asked} rates"
    ranked = sorted((t for t in trials if math.isfinite(t.end)), key=lambda t: (t.end, t.lr))
    if not ranked or not ranked[0].end < ranked[0].start:
        tried = "; ".join(t.describe() for t in trials)
        return None, (f"none of the {len(trials)} rates lowered the loss in {steps} steps ({tried}); "
                      "raise --confirm-steps, or judge the curve yourself")
    lowest = ranked[0]
    tied = [t for t in ranked if _tied(t.held, lowest.held)]
    w = max(tied, key=lambda t: t.lr)
    fell = f" (-{(w.start - w.end) / w.start:.0%})" if w.start > 0 and w.end >= 0 else ""
    others = "; ".join(t.describe() for t in trials if t is not w)
    src = f" ({_SOURCE_NAMES.get(w.source, w.source)})" if w.source else ""
    why = "lowered the loss most" if w is lowest else (
        f"lowered the loss as much as {_fmt(lowest.lr)} within the noise of the held-out batches, and is the "
        "higher rate (a short trial favours low rates)")
    return w, (f"{_fmt(w.lr)}{src} {why}: {w.start:.3g} -> {w.end:.3g}{fell} after {steps} steps from the "
               f"same weights (on {len(w.held)} batches none of them trained on); the others: {others}")


def _tied(a: np.ndarray, best: np.ndarray, z: float = 2.0) -> bool:
    """Whether ``a`` is no worse than ``best`` beyond ``z`` standard errors of their paired differences."""
    if a is best:
        return True
    d = a - best
    if d.size < 2:
        return False
    return float(d.mean()) <= z * float(d.std(ddof=1)) / math.sqrt(d.size)


def confirm_cost(rates: int, steps: int) -> float:
    """What confirming ``rates`` rates for ``steps`` steps costs, in training steps: their steps,
    and the held-out measurements (forward passes only, about a third of a step each)."""
    return rates * steps + (rates + 1) * held_out(steps) / 3


def held_out(steps: int) -> int:
    """How many batches after a confirmation's ``steps`` measure each rate's result."""
    return max(4, steps // 4)


# --------------------------------------------------------------------------- headless


class _ScriptData:
    """The script's training data, with failures while iterating reported as ScriptErrors."""

    def __init__(self, data: Iterable[Any], path: Path):
        self.data = data
        self.path = path
        self.epoch = 0

    def __iter__(self) -> Iterator[Any]:
        self.epoch += 1
        it = iter(self.data)
        got = False
        while True:
            try:
                batch = next(it)
            except StopIteration:
                break
            except LrvizError:
                raise
            except Exception as exc:
                from .experiment import error_from_exception

                raise error_from_exception(exc, self.path, f"iterating the training data (epoch {self.epoch})"
                                           ) from exc
            got = True
            yield batch
        if not got:
            what = "in epoch 1" if self.epoch == 1 else f"in epoch {self.epoch} (was it a one-shot iterator?)"
            raise ScriptError(f"build_data()'s training data yielded no batches {what}", str(self.path))


def _build(experiment: Any, config: Any, what: str) -> tuple[Any, ...]:
    """Seed, then build model, training data, optimizer and loss the way the engine does."""
    from .devices import resolve_device
    from .engine import seed_everything
    from .optim import build_optimizer

    cfg = config.validated()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = experiment.make_model(cfg.params).to(device)
    train, _val = experiment.make_data(cfg.batch_size, cfg.params)
    opt = experiment.make_optimizer(model, cfg.lr)
    if opt is None:
        opt = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay,
                              cfg.nesterov)
    script_loss = experiment.loss_function()
    fn = "compute_loss()" if callable(getattr(experiment.module, "compute_loss", None)) else "loss_fn()"
    path = str(experiment.path)
    step = [0]
    checked = [False]

    def loss_of(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        i = step[0]
        step[0] += 1
        try:
            loss = script_loss(m, batch)
        except Exception as exc:
            raise experiment.describe_batch_error(exc, batch, f"{what} step {i}") from exc
        if not checked[0] and torch.is_grad_enabled():  # the first loss that is trained on
            checked[0] = True
            try:
                _check_loss(loss)
            except ConfigError as exc:
                raise ScriptError(str(exc).replace("the loss function", fn, 1), path) from None
        return loss

    return model, opt, _ScriptData(train, experiment.path), loss_of, device


def find_lr(
    experiment: Any,
    config: Any,
    *,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    stop_factor: float = 4.0,
    method: str = "valley",
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float, float], Any] | None = None,
    confirm: bool | None = None,
    confirm_steps: int = CONFIRM_STEPS,
    on_confirm_step: Callable[[int, int, float, float], Any] | None = None,
) -> RangeTestResult:
    """Run the range test on an experiment, headless (``lrviz find-lr``).

    Seeds with ``config.seed`` and builds model, training data and optimizer the way
    :class:`lrviz.engine.TrainingEngine` does (device from ``config.device``; the script's own
    ``build_optimizer`` when it has one, else ``config.optimizer`` with its momentum and weight
    decay), then calls :func:`range_test`; ``confirm`` None (the default) confirms the suggestions
    when that costs fewer steps than the sweep. Errors in the script are :class:`ScriptError`
    naming the file and line; bad settings are :class:`ConfigError`.
    """
    _check_sweep(start, end, steps, beta, stop_factor, method)
    _check_confirm_steps(confirm_steps)
    model, opt, data, loss_of, device = _build(experiment, config, "range test")
    return range_test(model, opt, data, loss_of, start=start, end=end,
                      steps=steps, beta=beta, stop_factor=stop_factor, device=device,
                      should_stop=should_stop, on_step=on_step, method=method, confirm=confirm,
                      confirm_steps=confirm_steps, on_confirm_step=on_confirm_step)


def confirm_experiment(
    experiment: Any,
    config: Any,
    rates: Sequence[tuple[float, str]] | Sequence[float],
    *,
    steps: int = CONFIRM_STEPS,
    stop_factor: float = 4.0,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, float, float], Any] | None = None,
) -> Confirmation:
    """:func:`confirm_rates` on a fresh model of an experiment, built and seeded as :func:`find_lr`
    builds it (so from the weights a range test of the same settings started from)."""
    _check_confirm_steps(steps)
    model, opt, data, loss_of, device = _build(experiment, config, "confirmation")
    return confirm_rates(model, opt, data, loss_of, rates, steps=steps, stop_factor=stop_factor,
                         device=device, should_stop=should_stop, on_step=on_step)


def write_csv(result: RangeTestResult, path: str | Path) -> None:
    """Write ``lr,loss,smoothed`` rows (shortest round-trip floats, ``nan``/``inf``) atomically."""
    from .export import atomic_write

    lines = ["lr,loss,smoothed"]
    for a, b, c in zip(result.lrs.tolist(), result.losses.tolist(), result.smoothed.tolist()):
        lines.append(f"{a!r},{b!r},{c!r}")
    atomic_write(path, "\n".join(lines) + "\n")
