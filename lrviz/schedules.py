"""Learning-rate schedules: parsed from text, evaluated as pure functions of the step.

A schedule is written ``Name:arg=value,arg=value`` with the names and arguments of
``torch.optim.lr_scheduler`` (``StepLR:step_size=100,gamma=0.5``); lists use ``;``
(``MultiStepLR:milestones=100;200``), names and argument names are matched
case-insensitively, and ``warmup:steps=N[,start_factor=F]+OTHER`` puts a linear warm-up
before another schedule. ``constant`` (alias ``none``) means "no schedule".

Contract (what the engine and the UI rely on):

* Steps count optimizer updates. A schedule bound to ``base_lrs`` (the param groups'
  rates when it is applied at step ``k``) gives ``lrs(t)``, the rates for step ``k + t``;
  ``lrs(0)`` is the rate used at step ``k`` itself.
* ``lrs(t)`` equals what torch's scheduler of the same name and arguments puts in
  ``param_groups[i]["lr"]`` before the ``t``-th ``optimizer.step()`` (scheduler stepped
  after each update). lrviz uses closed forms where torch recurses, so values agree to
  ~1e-12 relative, not always bit for bit (torch's recursive forms drift; e.g. its
  cosine brings a group with base rate 0 back to -1e-17 instead of 0).
* Deliberate differences from torch:

  - ``OneCycleLR`` holds its final rate (``max_lr / div_factor / final_div_factor``) from
    step ``total_steps - 1`` on; torch raises after ``total_steps`` steps and, at exactly
    ``total_steps``, extrapolates the last phase past its end (for ``anneal_strategy=linear``
    that value is negative).
  - Momentum is never cycled: ``OneCycleLR`` and ``CyclicLR`` accept only
    ``cycle_momentum=false`` (torch's default is true). lrviz schedules learning rates only.
  - ``warmup+OTHER`` is defined as "OTHER applied at step N from the base rates". This is
    torch's ``SequentialLR([LinearLR(start_factor=F, total_iters=N), OTHER], [N])`` for
    every schedule except ``OneCycleLR``: torch's OneCycleLR overwrites the groups'
    ``initial_lr`` when it is constructed, so under SequentialLR the warm-up ramps towards
    ``max_lr / div_factor`` instead of the base rate.
  - Invalid or degenerate arguments torch accepts silently (or fails on later) are
    rejected up front: ``ConstantLR``/``LinearLR`` with ``total_iters=0``, ``factor=0``,
    repeated ``milestones``, a ``OneCycleLR`` first phase of zero length (torch divides 0
    by 0), ``OneCycleLR`` given both ``total_steps`` and ``epochs``/``steps_per_epoch``
    (torch silently ignores the latter), ``CyclicLR`` ``gamma > 1`` (an exploding
    ``exp_range``).
  - Where torch would raise OverflowError (``gamma ** t`` for large ``t``), lrviz saturates
    at the largest float.
  - ``ReduceLROnPlateau`` cannot follow ``warmup`` (torch's SequentialLR refuses it too).

* ``rescale(t_next, target)`` scales the whole schedule so ``lrs(t_next)[0] == target``
  exactly; the groups keep their ratios. A schedule whose value at ``t_next`` is 0 cannot
  be rescaled: ``rescale`` returns False and the engine drops it.
* ``ReduceLROnPlateau`` is the one stateful schedule: ``lrs(t)`` returns the current rates
  whatever ``t`` is, and ``observe_validation(metric)`` behaves like torch's
  ``ReduceLROnPlateau.step(metric)``. Its ``min_lr`` floor is absolute and is not rescaled.

Why ~1,100 lines in one module: it is one table (:data:`SCHEDULES`), the pure function of each of
torch's schedules with its argument checks (the torch-compatible closed forms are short but many), the
text parser and :class:`ScheduleSpec`; each part is read with the others when a schedule is added, and
nothing outside needs one part without the rest.
"""

from __future__ import annotations

import bisect
import difflib
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrviz.errors import ConfigError

log = logging.getLogger(__name__)

Curve = Callable[[int], list[float]]
"""Rates of every param group at step ``t`` (a fresh list per call)."""

STATE_FORMAT = 1


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ArgInfo:
    """One argument of a schedule, as the UI's form and the parser see it.

    ``kind`` is ``int``, ``float``, ``bool``, ``str`` (one of ``choices``), ``'list[int]'``
    (``;``-separated in text, a tuple in Python) or ``'list[float]'`` (one number for all
    param groups, or one per group separated by ``;``). ``default`` is torch's default;
    ``None`` means "derived from other arguments" (the help says how).
    """

    name: str
    kind: type | str
    default: object = None
    required: bool = False
    help: str = ""
    choices: tuple = ()


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule the parser knows: its canonical name, arguments and description."""

    name: str
    args: tuple[ArgInfo, ...]
    doc: str
    stateful: bool = False


@dataclass(frozen=True)
class _Arg:
    """An ArgInfo plus the range its values must lie in (checked on every spec)."""

    info: ArgInfo
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_fmt(self.low)}"
        return f"{'<' if self.high_open else '<='} {_fmt(self.high)}"

    def in_range(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))


def _arg(
    name: str,
    kind: type | str,
    default: object = None,
    help: str = "",
    *,
    required: bool = False,
    choices: tuple = (),
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> _Arg:
    info = ArgInfo(name, kind, default, required, help, choices)
    return _Arg(
        info, gt if gt is not None else ge, gt is not None, lt if lt is not None else le, lt is not None
    )


@dataclass(frozen=True)
class _Def:
    """How to validate and evaluate one schedule."""

    info: ScheduleInfo
    args: tuple[_Arg, ...]
    build: Callable[..., Curve] | None  # (base_lrs, **all_args) -> Curve; None for stateful ones
    check: Callable[[dict[str, Any]], None] | None = None  # cross-argument rules (all args given)
    example: str = ""

    def full_kwargs(self, given: Sequence[tuple[str, object]]) -> dict[str, Any]:
        """Every argument's value: the given ones, torch's defaults for the rest."""
        kw = {a.info.name: a.info.default for a in self.args}
        kw.update(given)
        return kw


# --------------------------------------------------------------------------- curves
#
# One small builder per schedule: it captures the arguments and returns a closure of t.
# The arithmetic mirrors torch's closed forms operation by operation so the values agree
# to the last bits where torch itself uses a closed form.


def _pow(x: float, n: float) -> float:
    """``x ** n``, saturating at the largest float instead of raising OverflowError.

    (Finite, so that a group whose rate is 0 stays at 0 instead of becoming 0 * inf = nan.)
    """
    try:
        return x**n
    except OverflowError:
        return sys.float_info.max


def _per_group(value: float | tuple[float, ...], n: int, what: str) -> tuple[float, ...]:
    """A per-group value: a scalar applies to all ``n`` groups, a list must have ``n`` items."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ConfigError(
                f"{what} has {len(value)} values but the optimizer has {n} param group(s); "
                f"give one value for all groups or exactly {n} separated by ';'"
            )
        return value
    return (float(value),) * n


def _proportional(base: tuple[float, ...], factor: Callable[[int], float]) -> Curve:
    """Every group at its base rate times ``factor(t)``."""

    def lrs(t: int) -> list[float]:
        f = factor(t)
        return [b * f for b in base]

    return lrs


def _constant(base: tuple[float, ...]) -> Curve:
    def lrs(t: int) -> list[float]:
        return list(base)

    return lrs


def _warmup(base: tuple[float, ...], steps: int, start_factor: float | None, then: Curve) -> Curve:
    start = 1.0 / steps if start_factor is None else start_factor
    ramp = _linear_lr(base, start, 1.0, steps)

    def lrs(t: int) -> list[float]:
        return ramp(t) if t < steps else then(t - steps)

    return lrs


def _step_lr(base: tuple[float, ...], step_size: int, gamma: float) -> Curve:
    return _proportional(base, lambda t: _pow(gamma, t // step_size))


def _multi_step_lr(base: tuple[float, ...], milestones: tuple[int, ...], gamma: float) -> Curve:
    return _proportional(base, lambda t: _pow(gamma, bisect.bisect_right(milestones, t)))


def _exponential_lr(base: tuple[float, ...], gamma: float) -> Curve:
    return _proportional(base, lambda t: _pow(gamma, t))


def _constant_lr(base: tuple[float, ...], factor: float, total_iters: int) -> Curve:
    return _proportional(base, lambda t: factor if t < total_iters else 1.0)


def _linear_lr(base: tuple[float, ...], start_factor: float, end_factor: float, total_iters: int) -> Curve:
    delta = end_factor - start_factor
    return _proportional(base, lambda t: start_factor + delta * min(total_iters, t) / total_iters)


def _polynomial_lr(base: tuple[float, ...], total_iters: int, power: float) -> Curve:
    return _proportional(base, lambda t: (1.0 - min(total_iters, t) / total_iters) ** power)


def _cosine_annealing_lr(base: tuple[float, ...], T_max: int, eta_min: float) -> Curve:
    # Past T_max the cosine continues (back up towards the base rate), as torch's does.
    def lrs(t: int) -> list[float]:
        c = 1 + math.cos(math.pi * t / T_max)
        return [eta_min + (b - eta_min) * c / 2 for b in base]

    return lrs


def _cosine_warm_restarts(base: tuple[float, ...], T_0: int, T_mult: int, eta_min: float) -> Curve:
    # Cycle n is T_0 * T_mult**n steps long; `starts` lists where each cycle begins (up to
    # ~1e18 steps), so finding the current cycle is one bisect, in exact integer arithmetic.
    starts = [0]
    while T_mult > 1 and starts[-1] < 10**18:
        starts.append(starts[-1] + T_0 * T_mult ** (len(starts) - 1))

    def lrs(t: int) -> list[float]:
        if T_mult == 1:
            t_cur, t_i = t % T_0, T_0
        else:
            n = bisect.bisect_right(starts, t) - 1
            t_cur, t_i = t - starts[n], T_0 * T_mult**n
        c = 1 + math.cos(math.pi * t_cur / t_i)
        return [eta_min + (b - eta_min) * c / 2 for b in base]

    return lrs


def _cyclic_lr(
    base: tuple[float, ...],
    base_lr: float | tuple[float, ...],
    max_lr: float | tuple[float, ...],
    step_size_up: int,
    step_size_down: int | None,
    mode: str,
    gamma: float,
    cycle_momentum: bool,
) -> Curve:
    del cycle_momentum  # validated false; lrviz never touches momentum
    lows = _per_group(base_lr, len(base), "CyclicLR base_lr")
    highs = _per_group(max_lr, len(base), "CyclicLR max_lr")
    pairs = tuple(zip(lows, highs))
    total_size = float(step_size_up) + float(step_size_down or step_size_up)
    step_ratio = float(step_size_up) / total_size

    def lrs(t: int) -> list[float]:
        cycle = math.floor(1 + t / total_size)
        x = 1.0 + t / total_size - cycle
        scale = x / step_ratio if x <= step_ratio else (x - 1) / (step_ratio - 1)
        if mode == "triangular":
            amp = 1.0
        elif mode == "triangular2":
            amp = 1 / _pow(2.0, cycle - 1)  # torch raises OverflowError after ~1000 cycles
        else:  # exp_range
            amp = _pow(gamma, t)
        return [lo + (hi - lo) * scale * amp for lo, hi in pairs]

    return lrs


def _anneal_cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _anneal_linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


def _one_cycle_phases(total_steps: int, pct_start: float, three_phase: bool) -> list[tuple[float, str, str]]:
    """torch's OneCycleLR phases: (last step of the phase, start rate, end rate)."""
    up_end = float(pct_start * total_steps) - 1
    if three_phase:
        return [
            (up_end, "initial", "max"),
            (float(2 * pct_start * total_steps) - 2, "max", "initial"),
            (total_steps - 1, "initial", "min"),
        ]
    return [(up_end, "initial", "max"), (total_steps - 1, "max", "min")]


def _one_cycle_lr(
    base: tuple[float, ...],
    max_lr: float | tuple[float, ...],
    total_steps: int | None,
    epochs: int | None,
    steps_per_epoch: int | None,
    pct_start: float,
    anneal_strategy: str,
    div_factor: float,
    final_div_factor: float,
    three_phase: bool,
    cycle_momentum: bool,
) -> Curve:
    del cycle_momentum  # validated false; lrviz never touches momentum
    total = _one_cycle_total(total_steps, epochs, steps_per_epoch)
    highs = _per_group(max_lr, len(base), "OneCycleLR max_lr")
    initial = tuple(h / div_factor for h in highs)
    levels = {"max": highs, "initial": initial, "min": tuple(i / final_div_factor for i in initial)}
    # Each phase: (last step, first step, per-group (start, end) pairs).
    phases = []
    start_step = 0.0
    for end_step, a, b in _one_cycle_phases(total, pct_start, three_phase):
        phases.append((end_step, start_step, tuple(zip(levels[a], levels[b]))))
        start_step = end_step
    anneal = _anneal_cos if anneal_strategy == "cos" else _anneal_linear
    last = total - 1

    def lrs(t: int) -> list[float]:
        t = min(t, last)  # hold the final value past the end (torch raises there)
        phase = phases[-1]
        for p in phases:
            if t <= p[0]:
                phase = p
                break
        end_step, start_step, pairs = phase
        pct = (t - start_step) / (end_step - start_step)
        return [anneal(s, e, pct) for s, e in pairs]

    return lrs


# --------------------------------------------------------------------------- cross-argument checks


def _no_momentum_cycling(name: str, kw: dict[str, Any]) -> None:
    if kw["cycle_momentum"]:
        raise ConfigError(
            f"{name}: cycle_momentum=true is not supported: lrviz schedules the learning rate only "
            "and leaves momentum alone; remove it or write cycle_momentum=false"
        )


def _check_multi_step(kw: dict[str, Any]) -> None:
    ms = kw["milestones"]
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise ConfigError(
            f"MultiStepLR: milestones must be strictly increasing, got {_fmt_value(ms)} (e.g. milestones=100;200)"
        )


def _check_cyclic(kw: dict[str, Any]) -> None:
    _no_momentum_cycling("CyclicLR", kw)


def _one_cycle_total(total_steps: int | None, epochs: int | None, steps_per_epoch: int | None) -> int:
    if total_steps is not None:
        if epochs is not None or steps_per_epoch is not None:
            raise ConfigError("OneCycleLR: give either total_steps or epochs and steps_per_epoch, not both")
        return total_steps
    if epochs is None or steps_per_epoch is None:
        raise ConfigError(
            "OneCycleLR needs total_steps (or both epochs and steps_per_epoch), "
            "e.g. OneCycleLR:max_lr=0.1,total_steps=1000"
        )
    return epochs * steps_per_epoch


def _check_one_cycle(kw: dict[str, Any]) -> None:
    _no_momentum_cycling("OneCycleLR", kw)
    total = _one_cycle_total(kw["total_steps"], kw["epochs"], kw["steps_per_epoch"])
    peaks = kw["max_lr"] if isinstance(kw["max_lr"], tuple) else (kw["max_lr"],)
    if not all(math.isfinite(p / kw["div_factor"] / kw["final_div_factor"]) for p in peaks):
        raise ConfigError(
            f"OneCycleLR: div_factor={_fmt(kw['div_factor'])} or final_div_factor="
            f"{_fmt(kw['final_div_factor'])} is too small: the initial or final rate overflows"
        )
    if float(kw["pct_start"] * total) - 1 == 0.0:
        # torch divides 0 by 0 at step 0 in this case.
        raise ConfigError(
            f"OneCycleLR: pct_start={_fmt(kw['pct_start'])} with {total} total steps makes the warm-up "
            "phase a single step long; use a larger or smaller pct_start"
        )


# --------------------------------------------------------------------------- the catalogue

_DEFS: dict[str, _Def] = {}


def _define(
    name: str,
    doc: str,
    args: Sequence[_Arg],
    build: Callable[..., Curve] | None,
    *,
    check: Callable[[dict[str, Any]], None] | None = None,
    example: str = "",
    stateful: bool = False,
) -> None:
    info = ScheduleInfo(name, tuple(a.info for a in args), doc, stateful)
    _DEFS[name] = _Def(info, tuple(args), build, check, example or name)


_GAMMA_HELP = "multiplicative factor of learning-rate decay"
_NO_MOMENTUM = "must be false: lrviz does not cycle momentum"
_PER_GROUP = "; one value for all param groups, or one per group separated by ';'"

_define(
    "constant",
    "No schedule: every group keeps its base rate. Also written 'none'.",
    [],
    _constant,
)
_define(
    "warmup",
    "Linear warm-up from start_factor × base to the base rate over `steps` steps; "
    "'warmup:steps=N+OTHER' then runs OTHER from step N as if applied there.",
    [
        _arg("steps", int, None, "number of warm-up steps", required=True, ge=1),
        _arg(
            "start_factor", float, None, "fraction of the base rate at step 0 (default 1/steps)", gt=0, le=1
        ),
    ],
    None,  # built by _build_curve, which knows the schedule that follows
    example="warmup:steps=100",
)
_define(
    "StepLR",
    "Multiply the rate by gamma every step_size steps.",
    [
        _arg("step_size", int, None, "period of the decay, in steps", required=True, ge=1),
        _arg("gamma", float, 0.1, _GAMMA_HELP, gt=0),
    ],
    _step_lr,
    example="StepLR:step_size=100",
)
_define(
    "MultiStepLR",
    "Multiply the rate by gamma at each milestone step.",
    [
        _arg(
            "milestones",
            "list[int]",
            None,
            "increasing steps at which to decay, separated by ';'",
            required=True,
            ge=1,
        ),
        _arg("gamma", float, 0.1, _GAMMA_HELP, gt=0),
    ],
    _multi_step_lr,
    check=_check_multi_step,
    example="MultiStepLR:milestones=100;200",
)
_define(
    "ExponentialLR",
    "Multiply the rate by gamma every step.",
    [_arg("gamma", float, None, _GAMMA_HELP, required=True, gt=0)],
    _exponential_lr,
    example="ExponentialLR:gamma=0.999",
)
_define(
    "ConstantLR",
    "Multiply the rate by factor for the first total_iters steps, then use the base rate.",
    [
        _arg("factor", float, 1.0 / 3, "multiplier applied before total_iters", gt=0, le=1),
        _arg("total_iters", int, 5, "number of steps the factor applies", ge=1),
    ],
    _constant_lr,
)
_define(
    "LinearLR",
    "Move the multiplier linearly from start_factor to end_factor over total_iters steps, then hold it.",
    [
        _arg("start_factor", float, 1.0 / 3, "multiplier at step 0", gt=0, le=1),
        _arg("end_factor", float, 1.0, "multiplier from total_iters on", ge=0, le=1),
        _arg("total_iters", int, 5, "length of the ramp, in steps", ge=1),
    ],
    _linear_lr,
)
_define(
    "PolynomialLR",
    "Decay to 0 as (1 - t/total_iters)**power over total_iters steps, then stay at 0.",
    [
        _arg("total_iters", int, 5, "steps until the rate reaches 0", ge=1),
        _arg("power", float, 1.0, "power of the polynomial", ge=0),
    ],
    _polynomial_lr,
)
_define(
    "CosineAnnealingLR",
    "Cosine from the base rate down to eta_min over T_max steps; past T_max the cosine "
    "continues back up, as in torch.",
    [
        _arg("T_max", int, None, "half period of the cosine, in steps", required=True, ge=1),
        _arg("eta_min", float, 0.0, "minimum learning rate", ge=0),
    ],
    _cosine_annealing_lr,
    example="CosineAnnealingLR:T_max=1000",
)
_define(
    "CosineAnnealingWarmRestarts",
    "Cosine from the base rate to eta_min, restarting every T_0 steps, each cycle T_mult times longer.",
    [
        _arg("T_0", int, None, "length of the first cycle, in steps", required=True, ge=1),
        _arg("T_mult", int, 1, "factor by which each cycle is longer than the previous", ge=1),
        _arg("eta_min", float, 0.0, "minimum learning rate", ge=0),
    ],
    _cosine_warm_restarts,
    example="CosineAnnealingWarmRestarts:T_0=100",
)
_define(
    "CyclicLR",
    "Triangular cycles between base_lr and max_lr (absolute rates; the current rate is ignored).",
    [
        _arg("base_lr", "list[float]", None, "lower rate of the cycle" + _PER_GROUP, required=True, ge=0),
        _arg("max_lr", "list[float]", None, "upper rate of the cycle" + _PER_GROUP, required=True, ge=0),
        _arg("step_size_up", int, 2000, "steps in the increasing half of a cycle", ge=1),
        _arg("step_size_down", int, None, "steps in the decreasing half (default step_size_up)", ge=1),
        _arg(
            "mode", str, "triangular", "amplitude policy", choices=("triangular", "triangular2", "exp_range")
        ),
        _arg("gamma", float, 1.0, "exp_range: amplitude multiplier per step", gt=0, le=1),
        _arg("cycle_momentum", bool, False, _NO_MOMENTUM),
    ],
    _cyclic_lr,
    check=_check_cyclic,
    example="CyclicLR:base_lr=1e-4,max_lr=1e-2",
)
_define(
    "OneCycleLR",
    "1cycle policy: from max_lr/div_factor up to max_lr, then down to "
    "max_lr/div_factor/final_div_factor (absolute rates); holds the final rate after total_steps.",
    [
        _arg("max_lr", "list[float]", None, "peak learning rate" + _PER_GROUP, required=True, gt=0),
        _arg(
            "total_steps",
            int,
            None,
            "length of the cycle, in steps (or give epochs and steps_per_epoch)",
            ge=1,
        ),
        _arg("epochs", int, None, "with steps_per_epoch, sets total_steps = epochs × steps_per_epoch", ge=1),
        _arg("steps_per_epoch", int, None, "with epochs, sets total_steps", ge=1),
        _arg("pct_start", float, 0.3, "fraction of the cycle spent increasing the rate", ge=0, le=1),
        _arg("anneal_strategy", str, "cos", "shape of each phase", choices=("cos", "linear")),
        _arg("div_factor", float, 25.0, "initial rate = max_lr / div_factor", gt=0),
        _arg("final_div_factor", float, 1e4, "final rate = initial rate / final_div_factor", gt=0),
        _arg("three_phase", bool, False, "come back down to the initial rate before annihilating"),
        _arg("cycle_momentum", bool, False, _NO_MOMENTUM),
    ],
    _one_cycle_lr,
    check=_check_one_cycle,
    example="OneCycleLR:max_lr=0.1,total_steps=1000",
)
_define(
    "ReduceLROnPlateau",
    "Multiply the rate by factor when the validation metric stops improving for `patience` "
    "validations (stateful: driven by observe_validation).",
    [
        _arg(
            "mode", str, "min", "whether the metric should go down (min) or up (max)", choices=("min", "max")
        ),
        _arg("factor", float, 0.1, "multiplier applied at each reduction", gt=0, lt=1),
        _arg("patience", int, 10, "validations without improvement tolerated before reducing", ge=0),
        _arg("threshold", float, 1e-4, "minimum change that counts as an improvement", ge=0),
        _arg(
            "threshold_mode",
            str,
            "rel",
            "threshold relative to the best value or absolute",
            choices=("rel", "abs"),
        ),
        _arg("cooldown", int, 0, "validations to wait after a reduction before counting again", ge=0),
        _arg("min_lr", "list[float]", 0.0, "lower bound on the rate" + _PER_GROUP, ge=0),
        _arg("eps", float, 1e-8, "reductions smaller than this are skipped", ge=0),
    ],
    None,  # stateful: _PlateauSchedule implements it
    example="ReduceLROnPlateau:factor=0.5,patience=3",
    stateful=True,
)

SCHEDULES: dict[str, ScheduleInfo] = {name: d.info for name, d in _DEFS.items()}
"""Every supported schedule by canonical name, in the order a picker should list them."""

_ALIASES = {"none": "constant"}
_CANONICAL = {name.lower(): name for name in _DEFS} | _ALIASES

# Torch arguments that are deliberately not accepted, with the reason shown to the user.
_UNSUPPORTED = {
    "last_epoch": "lrviz counts steps itself",
    "verbose": "lrviz logs schedule changes itself",
    "scale_fn": "a function cannot be written in schedule text; use mode=",
    "scale_mode": "it only applies with scale_fn",
    "base_momentum": "lrviz does not cycle momentum",
    "max_momentum": "lrviz does not cycle momentum",
}


# --------------------------------------------------------------------------- values


def _fmt(x: float) -> str:
    """A bound or number for a message: integers without '.0'."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _fmt_value(v: object) -> str:
    """Canonical text of an argument value (parses back to the same value)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return ";".join(_fmt_value(x) for x in v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _show(raw: object) -> str:
    """``repr`` of a user value, shortened to fit a one-line message."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _to_number(sched: str, name: str, raw: object, kind: type) -> float | int:
    """One int or float from text or a Python number; ConfigError names the argument."""
    what = "a whole number" if kind is int else "a number"
    try:
        x = _parse_number(raw)
        finite = math.isfinite(x)
    except (ValueError, TypeError):
        raise ConfigError(f"{sched}: {name} must be {what}, got {_show(raw)}") from None
    except OverflowError:
        raise ConfigError(f"{sched}: {name} is too large, got {_show(raw)}") from None
    if not finite:
        raise ConfigError(f"{sched}: {name} must be a finite number, got {_show(raw)}")
    if kind is int:
        if not float(x).is_integer():
            raise ConfigError(f"{sched}: {name} must be a whole number, got {_show(raw)}")
        return int(x)
    return float(x)


def _parse_number(raw: object) -> float | int:
    """An int if ``raw`` is written as one, else a float; ValueError/TypeError otherwise."""
    if isinstance(raw, bool):
        raise TypeError("a bool is not a number")
    if isinstance(raw, (int, float)):
        return raw
    if not isinstance(raw, str):
        raise TypeError(f"not a number: {raw!r}")
    try:
        return int(raw.strip())
    except ValueError:
        return float(raw)


def _items(sched: str, name: str, raw: object) -> list[object]:
    """The elements of a list argument: ';'-separated text or a Python sequence."""
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.split(";")]
        if not all(parts):
            raise ConfigError(f"{sched}: {name} has an empty item in {raw!r}; separate values with ';'")
        return list(parts)
    if isinstance(raw, (list, tuple)):
        if not raw:
            raise ConfigError(f"{sched}: {name} must not be empty")
        return list(raw)
    return [raw]


def _convert(sched: str, arg: _Arg, raw: object) -> object:
    """The typed, range-checked value of one argument given as text or as a Python value."""
    info = arg.info
    if info.kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ConfigError(f"{sched}: {info.name} must be true or false, got {_show(raw)}")
    if info.kind is str:
        text = str(raw).strip().lower()
        if text not in info.choices:
            raise ConfigError(
                f"{sched}: {info.name} must be one of {', '.join(info.choices)}, got {_show(raw)}"
            )
        return text
    if info.kind in (int, float):
        values = [_to_number(sched, info.name, raw, info.kind)]
    else:
        elem = int if info.kind == "list[int]" else float
        values = [_to_number(sched, info.name, x, elem) for x in _items(sched, info.name, raw)]
    for x in values:
        if not arg.in_range(x):
            raise ConfigError(f"{sched}: {info.name} must be {arg.range_text()}, got {_fmt_value(x)}")
    if info.kind == "list[int]" or (info.kind == "list[float]" and len(values) > 1):
        return tuple(values)
    return values[0]


def _normalize_args(d: _Def, raw: Mapping[str, object]) -> tuple[tuple[str, object], ...]:
    """Canonical (name, value) pairs in declaration order; ConfigError on any bad argument."""
    sched = d.info.name
    by_lower = {a.info.name.lower(): a for a in d.args}
    valid = ", ".join(a.info.name for a in d.args) or "none"
    given: dict[str, object] = {}
    for key, value in raw.items():
        arg = by_lower.get(str(key).strip().lower())
        if arg is None:
            why = _UNSUPPORTED.get(str(key).strip().lower())
            if why:
                raise ConfigError(f"{sched}: argument {key!r} is not supported ({why}); valid: {valid}")
            close = difflib.get_close_matches(str(key).lower(), list(by_lower), n=1, cutoff=0.6)
            hint = f" (did you mean {by_lower[close[0]].info.name!r}?)" if close else ""
            raise ConfigError(f"{sched} has no argument {key!r}{hint}; valid: {valid}")
        if arg.info.name in given:
            raise ConfigError(f"{sched}: argument {arg.info.name!r} is given twice")
        given[arg.info.name] = _convert(sched, arg, value)
    for a in d.args:
        if a.info.required and a.info.name not in given:
            raise ConfigError(f"{sched} needs {a.info.name}, e.g. {d.example}")
    pairs = tuple((a.info.name, given[a.info.name]) for a in d.args if a.info.name in given)
    if d.check is not None:
        d.check(d.full_kwargs(pairs))
    return pairs


def _lookup(name: str) -> _Def:
    """The definition of a schedule name (any case); ConfigError suggests the closest one."""
    key = str(name).strip().lower()
    if key in _CANONICAL:
        return _DEFS[_CANONICAL[key]]
    close = difflib.get_close_matches(key, list(_CANONICAL), n=1, cutoff=0.5)
    hint = f"did you mean {_CANONICAL[close[0]]!r}? " if close else ""
    raise ConfigError(f"unknown schedule {name!r}; {hint}known: {', '.join(_DEFS)}")


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ScheduleSpec:
    """A validated schedule description: canonical name, given arguments, optional successor.

    ``args`` may be passed as a mapping or as (name, value) pairs, with values as text or
    Python values; it is stored as canonical (name, value) pairs in declaration order (only
    the arguments given; defaults are filled in when bound). Lists are tuples, and a
    ``'list[float]'`` argument with a single value is a float. Construction raises
    ConfigError for anything invalid. ``then`` is only allowed after ``warmup``.
    """

    name: str
    args: tuple[tuple[str, object], ...] | Mapping[str, object] = ()
    then: ScheduleSpec | None = None

    def __post_init__(self) -> None:
        d = _lookup(self.name)
        raw = self.args
        if not isinstance(raw, Mapping):
            pairs = list(raw)
            raw = dict(pairs)
            if len(raw) != len(pairs):
                raise ConfigError(f"{d.info.name}: an argument is given twice")
        object.__setattr__(self, "name", d.info.name)
        object.__setattr__(self, "args", _normalize_args(d, raw))
        if self.then is not None:
            if d.info.name != "warmup":
                raise ConfigError(
                    f"only warmup can be followed by another schedule ('warmup:steps=N+OTHER'), "
                    f"not {d.info.name}"
                )
            if not isinstance(self.then, ScheduleSpec):
                raise ConfigError(f"the schedule after warmup must be a ScheduleSpec, got {self.then!r}")
            if self.then.name in ("warmup", "ReduceLROnPlateau"):
                raise ConfigError(
                    f"warmup cannot be followed by {self.then.name}; use one warmup before "
                    "a step-based schedule"
                )

    @property
    def kwargs(self) -> dict[str, object]:
        """The given arguments as a dict."""
        return dict(self.args)

    @property
    def info(self) -> ScheduleInfo:
        """The catalogue entry of this schedule."""
        return SCHEDULES[self.name]

    @property
    def stateful(self) -> bool:
        """Whether the schedule depends on observations (ReduceLROnPlateau), not only on steps."""
        return self.info.stateful

    def __str__(self) -> str:
        head = self.name
        if self.args:
            head += ":" + ",".join(f"{k}={_fmt_value(v)}" for k, v in self.args)
        return f"{head}+{self.then}" if self.then is not None else head

    def bind(self, base_lrs: Sequence[float]) -> Schedule:
        """The schedule applied to param groups whose current rates are ``base_lrs``."""
        base = _check_base_lrs(base_lrs)
        if self.stateful:
            return _PlateauSchedule(self, base)
        return Schedule(self, base)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CHAIN = re.compile(r"\+(?=\s*[A-Za-z_])")  # '+' before a name; '1e+3' stays a number


def _split_part(part: str, text: str) -> tuple[str, dict[str, str]]:
    """Name and raw argument texts of one ``Name:arg=value,...`` piece."""
    name, colon, rest = part.partition(":")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"malformed schedule {text!r}: expected Name or Name:arg=value,... (e.g. StepLR:step_size=100)"
        )
    args: dict[str, str] = {}
    if not colon:
        return name, args
    if not rest.strip():
        raise ConfigError(f"malformed schedule {text!r}: nothing after ':'; write {name} or {name}:arg=value")
    for item in rest.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not (eq and key and value):
            raise ConfigError(f"malformed argument {item.strip()!r} in {text!r}: expected name=value")
        if key.lower() in (k.lower() for k in args):
            raise ConfigError(f"{name}: argument {key!r} is given twice in {text!r}")
        args[key] = value
    return name, args


def parse_schedule(text: str) -> ScheduleSpec:
    """The spec written in ``text`` (``Name:arg=value,...``, ``warmup:steps=N+OTHER``, ``constant``).

    Raises ConfigError with a one-line, actionable message for anything invalid.
    """
    if not isinstance(text, str):
        raise ConfigError(f"a schedule must be text like 'StepLR:step_size=100', got {text!r}")
    if not text.strip():
        raise ConfigError("empty schedule: write e.g. 'StepLR:step_size=100', or 'constant' for none")
    parts = _CHAIN.split(text.strip())
    if len(parts) > 2:
        raise ConfigError(f"too many '+' in {text!r}: only 'warmup:steps=N+OTHER' can be chained")
    if not parts[0].strip():
        raise ConfigError(f"malformed schedule {text!r}: nothing before '+'")
    specs = [_split_part(p, text) for p in parts]
    then = ScheduleSpec(*specs[1]) if len(specs) == 2 else None
    return ScheduleSpec(specs[0][0], specs[0][1], then)


def _check_base_lrs(base_lrs: Sequence[float]) -> tuple[float, ...]:
    try:
        base = tuple(float(x) for x in base_lrs)
    except (TypeError, ValueError):
        raise ConfigError(f"base learning rates must be numbers, got {base_lrs!r}") from None
    if not base:
        raise ConfigError("a schedule needs at least one param group's learning rate")
    if not all(math.isfinite(b) and b >= 0 for b in base):
        raise ConfigError(f"base learning rates must be finite and >= 0, got {list(base)}")
    return base


def _build_curve(spec: ScheduleSpec, base: tuple[float, ...]) -> Curve:
    d = _DEFS[spec.name]
    kw = d.full_kwargs(spec.args)
    if spec.name == "warmup":
        then = _build_curve(spec.then, base) if spec.then is not None else _constant(base)
        return _warmup(base, then=then, **kw)
    assert d.build is not None
    return d.build(base, **kw)


def _check_target(target_lr: float) -> float:
    target = float(target_lr)
    if not (math.isfinite(target) and target >= 0):
        raise ConfigError(f"a learning rate must be finite and >= 0, got {target_lr!r}")
    return target


# --------------------------------------------------------------------------- schedule


class Schedule:
    """A spec bound to param groups: the rates at each step since it was applied.

    ``lrs(t)`` is a pure function of ``t`` (apart from ``rescale``), cheap enough to call
    once per training step.
    """

    spec: ScheduleSpec
    base_lrs: tuple[float, ...]
    stateful: bool = False

    def __init__(self, spec: ScheduleSpec, base_lrs: tuple[float, ...]):
        self.spec = spec
        self._set_base(base_lrs)
        # lrs = curve(t) / _den * _num; (1, 1) until rescaled. Dividing by the anchor value
        # itself makes the rescaled rate at the anchor step exact.
        self._num = 1.0
        self._den = 1.0
        self._scaled = False

    def _set_base(self, base_lrs: tuple[float, ...]) -> None:
        self.base_lrs = base_lrs
        self._curve = _build_curve(self.spec, base_lrs)

    def __repr__(self) -> str:
        return f"<Schedule {self.spec} base_lrs={list(self.base_lrs)}>"

    def lrs(self, t: int) -> list[float]:
        """Rates of every param group at ``t >= 0`` steps after the schedule was applied."""
        if t < 0:
            raise ValueError(f"schedule step must be >= 0, got {t}")
        if self._scaled:
            num, den = self._num, self._den
            return [x / den * num for x in self._curve(t)]
        return self._curve(t)

    def preview(self, n: int, start: int = 0) -> np.ndarray:
        """Rates for steps ``start .. start+n-1``, shape (n, groups), for plotting."""
        if n < 0 or start < 0:
            raise ValueError(f"preview needs n >= 0 and start >= 0, got n={n}, start={start}")
        rows = [self.lrs(t) for t in range(start, start + n)]
        return np.array(rows, dtype=np.float64).reshape(n, len(self.base_lrs))

    def rescale(self, t_next: int, target_lr: float) -> bool:
        """Scale the whole schedule so that ``lrs(t_next)[0] == target_lr`` exactly.

        All groups are scaled by the same factor. Returns False (and changes nothing) when
        the unscaled rate at ``t_next`` is 0: no factor can reach the target, so the caller
        should drop the schedule.
        """
        target = _check_target(target_lr)
        anchor = self._curve(t_next)[0]
        if anchor == 0 or not math.isfinite(anchor):
            log.debug("cannot rescale %s at t=%d: its rate there is %r", self.spec, t_next, anchor)
            return False
        self._num, self._den, self._scaled = target, anchor, True
        log.debug("rescaled %s by %.6g at t=%d", self.spec, target / anchor, t_next)
        return True

    def observe_validation(self, metric: float) -> bool:
        """Record a validation result; step-based schedules ignore it and return False."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as plain Python values."""
        return {
            "format": STATE_FORMAT,
            "spec": str(self.spec),
            "base_lrs": list(self.base_lrs),
            "scale": [self._num, self._den] if self._scaled else None,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` taken from a schedule with the same spec."""
        try:
            if d.get("format") != STATE_FORMAT:
                raise ConfigError(f"unsupported schedule state format {d.get('format')!r}")
            spec = parse_schedule(d["spec"])
            if spec != self.spec:
                raise ConfigError(f"saved schedule {spec} does not match this one ({self.spec})")
            base = _check_base_lrs(d["base_lrs"])
            if len(base) != len(self.base_lrs):
                raise ConfigError(
                    f"saved schedule has {len(base)} param group(s), this one has {len(self.base_lrs)}"
                )
            self._set_base(base)
            scale = d["scale"]
            self._scaled = scale is not None
            self._num, self._den = (float(scale[0]), float(scale[1])) if scale is not None else (1.0, 1.0)
            self._load_extra(d)
        except (KeyError, TypeError, IndexError) as e:
            raise ConfigError(f"invalid saved schedule state: {e!r}") from None

    def _load_extra(self, d: Mapping[str, Any]) -> None:
        """Subclass hook: restore what ``state_dict`` added beyond the common keys."""

    @staticmethod
    def from_state_dict(d: Mapping[str, Any]) -> Schedule:
        """A new schedule restored from ``state_dict`` output alone."""
        try:
            schedule = parse_schedule(d["spec"]).bind(d["base_lrs"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid saved schedule state: {e!r}") from None
        schedule.load_state_dict(d)
        return schedule


class _PlateauSchedule(Schedule):
    """ReduceLROnPlateau: the rates change only when validation stops improving."""

    stateful = True

    def __init__(self, spec: ScheduleSpec, base_lrs: tuple[float, ...]):
        super().__init__(spec, base_lrs)
        kw = _DEFS[spec.name].full_kwargs(spec.args)
        self._mode: str = kw["mode"]
        self._factor: float = kw["factor"]
        self._patience: int = kw["patience"]
        self._threshold: float = kw["threshold"]
        self._threshold_mode: str = kw["threshold_mode"]
        self._cooldown: int = kw["cooldown"]
        self._min_lrs = _per_group(kw["min_lr"], len(base_lrs), "ReduceLROnPlateau min_lr")
        self._eps: float = kw["eps"]
        self._reset()

    def _reset(self) -> None:
        self._current = list(self.base_lrs)
        self._best = math.inf if self._mode == "min" else -math.inf
        self._num_bad = 0
        self._cooldown_left = 0
        self._observed = 0

    def _set_base(self, base_lrs: tuple[float, ...]) -> None:
        self.base_lrs = base_lrs
        self._curve = self._current_rates

    def _current_rates(self, t: int) -> list[float]:
        return list(self._current)

    def lrs(self, t: int) -> list[float]:
        """The current rates (``t`` only has to be >= 0)."""
        if t < 0:
            raise ValueError(f"schedule step must be >= 0, got {t}")
        return list(self._current)

    def rescale(self, t_next: int, target_lr: float) -> bool:
        """Scale the current rates so group 0's is ``target_lr``; False if it is 0."""
        target = _check_target(target_lr)
        anchor = self._current[0]
        if anchor == 0:
            return False
        self._current = [x / anchor * target for x in self._current]
        log.debug("rescaled %s to %r", self.spec, self._current)
        return True

    def _is_better(self, a: float, best: float) -> bool:
        if self._mode == "min":
            return a < (
                best * (1.0 - self._threshold) if self._threshold_mode == "rel" else best - self._threshold
            )
        return a > (
            best * (self._threshold + 1.0) if self._threshold_mode == "rel" else best + self._threshold
        )

    def observe_validation(self, metric: float) -> bool:
        """Record a validation metric; True when this reduced at least one group's rate."""
        current = float(metric)
        self._observed += 1
        if self._is_better(current, self._best):
            self._best = current
            self._num_bad = 0
        else:
            self._num_bad += 1
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            self._num_bad = 0  # bad validations during cooldown do not count
        if self._num_bad <= self._patience:
            return False
        reduced = False
        for i, old in enumerate(self._current):
            new = max(old * self._factor, self._min_lrs[i])
            if old - new > self._eps:
                self._current[i] = new
                reduced = True
        self._cooldown_left = self._cooldown
        self._num_bad = 0
        if reduced:
            log.info(
                "ReduceLROnPlateau: no improvement for %d validation(s), learning rates now %s",
                self._patience + 1,
                self._current,
            )
        return reduced

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as plain Python values."""
        d = super().state_dict()
        d["plateau"] = {
            "current": list(self._current),
            "best": self._best,
            "num_bad": self._num_bad,
            "cooldown_left": self._cooldown_left,
            "observed": self._observed,
        }
        return d

    def _load_extra(self, d: Mapping[str, Any]) -> None:
        p = d["plateau"]
        current = [float(x) for x in p["current"]]
        if len(current) != len(self.base_lrs):
            raise ConfigError(f"saved plateau state has {len(current)} rates for {len(self.base_lrs)} groups")
        self._current = current
        self._best = float(p["best"])
        self._num_bad = int(p["num_bad"])
        self._cooldown_left = int(p["cooldown_left"])
        self._observed = int(p["observed"])
