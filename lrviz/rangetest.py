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
(:class:`Suggestions`): ``steepest``, ``valley`` and ``minimum_tenth``. When the curve is too short
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .devices import to_device
from .errors import ConfigError, LrvizError, ScriptError
from .staging import GradNorm

__all__ = [
    "METHODS",
    "MIN_POINTS",
    "RangeTestProgress",
    "RangeTestResult",
    "Suggestions",
    "find_lr",
    "range_test",
    "suggest",
    "write_csv",
]

log = logging.getLogger(__name__)

#: The suggestion methods, in the order they are shown.
METHODS = ("steepest", "valley", "minimum_tenth")
#: Fewer finite points than this and no suggestion is made.
MIN_POINTS = 10
#: Where in the longest valley the ``valley`` method picks its rate (fastai documents "roughly 2/3").
VALLEY_FRACTION = 2 / 3

LossOf = Callable[[torch.nn.Module, Any], torch.Tensor]


# --------------------------------------------------------------------------- results


@dataclass
class Suggestions:
    """Learning rates suggested by several methods on one range-test curve.

    ``steepest``: the rate of the steepest descent of the smoothed loss against log10(lr).
    ``valley``: fastai's valley method, a rate about 2/3 of the way into the longest descent.
    ``minimum_tenth``: a tenth of the rate at the lowest smoothed loss.
    ``chosen`` names the method whose value is "the" suggestion (:attr:`best`). When the curve
    cannot be judged, every value is None and ``reason`` says why in words.
    """

    steepest: float | None
    valley: float | None
    minimum_tenth: float | None
    chosen: str = "valley"
    reason: str | None = None

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
        """A JSON-friendly dict: every method's value, ``chosen``, ``best`` and ``reason``."""
        return {**self.values(), "chosen": self.chosen, "best": self.best, "reason": self.reason}


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


def _longest_descent(y: np.ndarray) -> tuple[int, int]:
    """First and last index of the longest strictly decreasing subsequence of ``y``.

    Of the longest ones, the one ending first, traced back through the latest predecessors.
    """
    n = len(y)
    length = np.ones(n, dtype=np.int64)
    prev = np.full(n, -1, dtype=np.int64)
    for i in range(1, n):
        higher = np.flatnonzero(y[:i] > y[i])
        if higher.size:
            lens = length[higher]
            best = lens.max()
            j = higher[np.flatnonzero(lens == best)[-1]]  # the latest predecessor of that length
            length[i] = best + 1
            prev[i] = j
    last = int(np.argmax(length))
    first = last
    while prev[first] >= 0:
        first = int(prev[first])
    return first, last


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def suggest(
    lrs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    beta: float = 0.98,
    method: str = "valley",
) -> Suggestions:
    """Suggest learning rates from a range-test curve of raw losses (smoothed here with ``beta``).

    Points whose loss or rate is not finite (or whose rate is not > 0) are dropped first. The first
    tenth of the rest is skipped (the smoothing is still warming up there) and so is everything
    after the lowest smoothed loss; the descent in between is what is judged:

    - ``steepest``: the rate where d(smoothed loss)/d(log10 lr) is most negative;
    - ``valley``: the longest strictly decreasing run of the smoothed loss (fastai's "valley", a
      subsequence, so small bumps do not break it), and the rate 2/3 of the way along it;
    - ``minimum_tenth``: the rate at the lowest smoothed loss, divided by 10.

    With fewer than :data:`MIN_POINTS` finite points, rates that do not increase, or a loss that
    never falls, every suggestion is None and ``reason`` says why. ``beta=0`` judges the raw curve.
    """
    b = _check_beta(beta)
    chosen = _check_method(method)
    x = np.asarray(lrs, dtype=np.float64).ravel()
    y = np.asarray(losses, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ConfigError(f"suggest needs as many learning rates as losses, not {x.size} and {y.size}")

    def none(reason: str) -> Suggestions:
        return Suggestions(None, None, None, chosen, reason)

    keep = np.isfinite(y) & np.isfinite(x) & (x > 0)
    n = int(keep.sum())
    if n == 0:
        return none("no finite losses" if y.size else "no losses recorded")
    if n < MIN_POINTS:
        if not np.isfinite(y[-1]):
            return none(f"the loss diverged after only {n} step{'s' if n != 1 else ''}; lower --start")
        return none(f"only {n} finite loss{'es' if n != 1 else ''}; at least {MIN_POINTS} are needed "
                    "(raise --steps)")
    x, y = x[keep], y[keep]
    if np.any(np.diff(x) <= 0):
        return none("the learning rate does not increase from step to step, so this is not a "
                    "range-test curve")
    s = smooth(y, b)
    logx = np.log10(x)
    lo = n // 10
    m = int(np.argmin(s))
    if m < lo + 2:
        return none(f"the loss never fell: its lowest point is at lr {_fmt(x[m])}, at the start of the "
                    "sweep; lower --start")
    grad = np.gradient(s, logx)
    steepest = float(x[lo + int(np.argmin(grad[lo:m]))])
    first, last = _longest_descent(s[lo:m + 1])
    valley = float(x[lo + first + int(round(VALLEY_FRACTION * (last - first)))])
    return Suggestions(steepest, valley, float(x[m]) / 10, chosen, None)


# --------------------------------------------------------------------------- saving and restoring


class _Snapshot:
    """Everything a range test changes, saved bit for bit and put back by :meth:`restore`.

    The model's parameters, buffers (persistent or not) and gradients are restored into the very
    tensor objects they were (the optimizer and anything else holding them keep working), each
    module's ``training`` flag, the optimizer's per-parameter state and param-group settings, and
    the random number generators.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
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
        for k, v in zip(self.state_keys, self.state_values):
            opt.state[k] = v
        for group, saved, params in zip(opt.param_groups, self.groups, self.group_params):
            group.clear()
            group["params"] = params
            group.update(saved)
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
    amp: str | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
) -> RangeTestResult:
    """Sweep the learning rate from ``start`` to ``end`` exponentially over ``steps`` optimizer steps.

    Each step sets every param group's lr, computes ``loss_of(model, batch)`` (batches moved to
    ``device`` when it is not the CPU), records the loss, and (when it is finite) steps the
    optimizer. ``batches`` is iterated again whenever it runs out. The sweep stops early when the
    smoothed loss exceeds ``stop_factor`` times its best (for a negative best: rises by
    ``stop_factor - 1`` times its magnitude), when the loss is not finite, or when
    ``should_stop()`` (polled before every step) returns True. ``on_step(i, lr, loss)`` is
    called after every step. The model runs in train mode.

    ``amp``, ``accumulate`` and ``clip_grad_norm`` make each step as the run does
    (:class:`lrviz.update.UpdateStep`): one step is one update over ``accumulate`` batches, its loss the
    mean of theirs; the forward pass under autocast (fp16 with a fresh gradient scaler, which skips the
    update of a step whose gradients overflow); the gradients clipped before the update.

    Model, optimizer and random number generators are restored exactly afterwards (in a
    ``finally:``, so also when ``loss_of`` raises; the exception then propagates). Bad settings
    raise :class:`ConfigError` before anything runs. One host sync per step reads the loss (the
    early stop needs it).
    """
    start, end, steps, beta, stop_factor, method = _check_sweep(start, end, steps, beta, stop_factor, method)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"range test needs a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"range test needs a torch.optim.Optimizer, not {type(optimizer).__name__}")
    if not isinstance(batches, Iterable):  # not iter(): creating a DataLoader iterator draws from the RNG
        raise ConfigError(f"range test data of type {type(batches).__name__} cannot be iterated")
    dev = torch.device(device) if device is not None else None
    move = dev is not None and dev.type != "cpu"
    upd = _update_step(optimizer, dev, amp, accumulate, clip_grad_norm)
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
    snapshot = _Snapshot(model, optimizer)
    upd_norm = GradNorm(upd.params) if upd is not None else None
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
                model.zero_grad(set_to_none=True)
                optimizer.zero_grad(set_to_none=True)
                if upd is not None:  # mixed precision, accumulation or clipping
                    value = _accumulate(upd, model, data, loss_of, dev if move else None, first=i == 0)
                    loss = None
                else:
                    batch = next(data)
                    if move:
                        batch = to_device(batch, dev)
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
                    if upd is not None:
                        upd.finish(upd_norm, upd.accumulate)
                        upd.step()
                    else:
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
    sugg = suggest(lrs, losses, beta=beta, method=method)
    n_finite = int(np.isfinite(losses).sum())
    if sugg.reason is not None:
        plural = "s" if done != 1 else ""
        if done == 0:
            sugg.reason = "cancelled before the first step"
        elif n_finite == 0:
            sugg.reason = (f"no finite losses: the loss was {losses[0]} from the first step (lr {_fmt(start)}); "
                           "check the model and the data, or lower --start")
        elif n_finite < MIN_POINTS and stop_reason.startswith("cancelled"):
            sugg.reason = f"cancelled after only {done} step{plural}; at least {MIN_POINTS} are needed"
        elif n_finite < MIN_POINTS and stop_reason:
            sugg.reason = (f"the loss diverged after only {done} step{plural} (at lr {_fmt(float(lrs[-1]))}); "
                           "lower --start")
    log.debug("range test: %d steps in %.3fs; %s; suggestions %s", done, seconds,
              stop_reason or "all steps done", sugg.to_dict())
    return RangeTestResult(lrs, losses, smoothed, bool(stop_reason), stop_reason, sugg, start=start, end=end,
                           steps=steps, beta=beta, stop_factor=stop_factor, seconds=seconds)


def _update_step(optimizer: torch.optim.Optimizer, dev: torch.device | None, amp: str | None, accumulate: Any,
                 clip_grad_norm: Any) -> Any:
    """The UpdateStep of a range test with those settings (None: a plain step); ConfigError when one is bad."""
    from .config import RunConfig
    from .update import UpdateStep, check_amp

    cfg = RunConfig(amp=amp, accumulate=accumulate, clip_grad_norm=clip_grad_norm).validated()
    where = dev if dev is not None else torch.device("cpu")
    check_amp(cfg.amp, where)
    upd = UpdateStep(optimizer, where, amp=cfg.amp, accumulate=cfg.accumulate, clip_grad_norm=cfg.clip_grad_norm)
    return None if upd.plain else upd


def _accumulate(upd: Any, model: torch.nn.Module, data: Iterator[Any], loss_of: LossOf, dev: torch.device | None,
                *, first: bool) -> float:
    """Forward and backward of one step's micro-batches; the mean of their losses (one host sync each)."""
    total = 0.0
    for j in range(upd.accumulate):
        batch = next(data)
        if dev is not None:
            batch = to_device(batch, dev)
        with upd.autocast():
            loss = loss_of(model, batch)
        if first and j == 0:
            _check_loss(loss)
        total += float(loss.detach())
        upd.backward(loss)
        del loss
    return total / upd.accumulate


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
) -> RangeTestResult:
    """Run the range test on an experiment, headless (``lrviz find-lr``).

    Seeds with ``config.seed`` and builds model, training data and optimizer the way
    :class:`lrviz.engine.TrainingEngine` does (device from ``config.device``; the script's own
    ``build_optimizer`` when it has one, else ``config.optimizer`` with its momentum and weight
    decay), then calls :func:`range_test` with the config's ``amp``, ``accumulate`` and
    ``clip_grad_norm``. Errors in the script are :class:`ScriptError` naming
    the file and line; bad settings are :class:`ConfigError`.
    """
    from .devices import resolve_device
    from .engine import seed_everything
    from .optim import build_optimizer

    _check_sweep(start, end, steps, beta, stop_factor, method)
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

    per_step = cfg.accumulate

    def loss_of(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        i = step[0]
        step[0] += 1
        try:
            loss = script_loss(m, batch)
        except Exception as exc:
            micro = f", micro-batch {i % per_step + 1} of {per_step}" if per_step > 1 else ""
            raise experiment.describe_batch_error(exc, batch, f"range test step {i // per_step}{micro}") from exc
        if i == 0:
            try:
                _check_loss(loss)
            except ConfigError as exc:
                raise ScriptError(str(exc).replace("the loss function", fn, 1), path) from None
        return loss

    return range_test(model, opt, _ScriptData(train, experiment.path), loss_of, start=start, end=end,
                      steps=steps, beta=beta, stop_factor=stop_factor, device=device,
                      should_stop=should_stop, on_step=on_step, method=method, amp=cfg.amp,
                      accumulate=cfg.accumulate, clip_grad_norm=cfg.clip_grad_norm)


def write_csv(result: RangeTestResult, path: str | Path) -> None:
    """Write ``lr,loss,smoothed`` rows (shortest round-trip floats, ``nan``/``inf``) atomically."""
    from .export import atomic_write

    lines = ["lr,loss,smoothed"]
    for a, b, c in zip(result.lrs.tolist(), result.losses.tolist(), result.smoothed.tolist()):
        lines.append(f"{a!r},{b!r},{c!r}")
    atomic_write(path, "\n".join(lines) + "\n")
