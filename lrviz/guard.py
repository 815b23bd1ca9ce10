"""The divergence guard: watches loss and gradient norm step by step and says when training goes wrong.

The engine calls :meth:`DivergenceGuard.update` once per step with plain floats. It keeps a few
running statistics and two small ring buffers, so the common case costs about a microsecond
(no NumPy, no allocation). It returns a :class:`Detection` when it sees

- ``nonfinite``: the loss or the gradient norm is NaN or infinite;
- ``loss_explosion``: the smoothed loss (debiased EMA, beta 0.98, as fastai's ``lr_find``) rose above
  ``explosion_factor`` x its best value so far, and by enough to give back a real part of the
  progress made since the start (``min_rise``), so noise around a loss near zero does not fire;
- ``grad_spike``: the gradient norm jumped above ``grad_spike_factor`` x its running root mean square
  (for steady norms that is the average; heavy-tailed batch noise, as at batch size 1, raises it);
- ``oscillation``: over the last ``oscillation_window`` steps the loss went up, down, up, down
  (almost every step-to-step difference changed sign) and the swings kept growing (checked every
  4th step, once the window is full).

Nothing fires during the first ``warmup_steps`` steps except ``nonfinite``. After a detection the
same kind stays silent until its condition has been clear for ``quiet_steps`` steps, so one episode
is reported once; :meth:`DivergenceGuard.reset` (after a roll-back) forgets everything but the config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

KINDS = ("nonfinite", "loss_explosion", "grad_spike", "oscillation")

#: EMA factor of the smoothed loss and of the gradient-norm average (as fastai's lr_find).
BETA = 0.98
#: The best smoothed loss is tracked from this many steps on (a debiased EMA of a few batches is noisy).
BEST_FROM = 10
#: A gradient spike must also exceed the average by this fraction of the early gradient norm, so float
#: noise around a converged toy problem does not fire.
GRAD_FLOOR = 1e-3
#: The loss entering the smoothed loss is capped at this x explosion_factor x the smoothed loss, so
#: one outlier batch cannot fire ``loss_explosion`` by itself (a sustained rise still does, within
#: ~10 steps).
OUTLIER_CAP = 2.0
#: Oscillation: the share of steps whose loss change must reverse the previous one, the share of
#: swings that must be larger than the swing two steps before, and the growth of the mean swing
#: from the first to the second half of the window.
ALTERNATION_SHARE = 0.9
GROWING_SHARE = 0.8
SWING_GROWTH = 1.25

_EXPLANATIONS = {
    "nonfinite": (
        "When the learning rate is too high, each update overshoots the minimum by more than it "
        "corrects, so the weights grow step after step until the numbers overflow to infinity or NaN. "
        "Nothing more can be learned from this state: roll back to the last good checkpoint and lower "
        "the learning rate about 10x (warmup or gradient clipping also help)."
    ),
    "loss_explosion": (
        "A learning rate that is too high makes each step overshoot the minimum: the update jumps past "
        "the bottom of the valley to a point higher up the other side, and the next, larger step lands "
        "higher still. Lower the learning rate about 10x and roll back to the last good checkpoint; if "
        "the loss rose only after a good start, a warmup or a decaying schedule helps."
    ),
    "grad_spike": (
        "A sudden jump in the gradient norm means the weights landed somewhere much steeper than "
        "before, typically because the previous steps were larger than the local curvature allows and "
        "threw them up a wall of the valley. One spike can be harmless, but repeated ones usually come "
        "before a blow-up: lower the learning rate (about 10x, or 2-3x if the loss still falls), add "
        "warmup or gradient clipping, or roll back to the last good checkpoint."
    ),
    "oscillation": (
        "The loss goes up, down, up with growing swings: each step jumps across the valley to the "
        "other side and lands a little higher than the last, because the step is larger than the "
        "curvature in that direction allows (for plain SGD, larger than 2 / curvature). Left alone this "
        "usually blows up: lower the learning rate 2-10x or start a decaying schedule, and roll back to "
        "the last good checkpoint if the loss has already risen."
    ),
}


@dataclass
class Detection:
    """Something the guard saw going wrong at ``step``, in words for people and in numbers.

    ``kind`` is one of :data:`KINDS`; ``message`` says what was seen with the numbers,
    ``explanation`` why a too-high learning rate causes it and what to do; ``data`` holds the
    numbers themselves (e.g. ``value``, ``reference``, ``ratio``) for plots and logs.
    """

    kind: str
    step: int
    message: str
    explanation: str
    data: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and event-friendly)."""
        return asdict(self)


@dataclass
class GuardConfig:
    """Thresholds of the guard.

    ``explosion_factor``: the smoothed loss above this x its best value (for a negative best loss,
    above ``best + (factor - 1) * |best|``). ``grad_spike_factor``: the gradient norm above this x
    its running average. ``warmup_steps``: steps before anything but ``nonfinite`` can fire.
    ``oscillation_window``: steps the oscillation test looks back over. ``enabled``: the kinds
    checked. ``quiet_steps``: after a detection, the same kind stays silent until its condition has
    been clear this long. ``min_rise``: a loss explosion must also give back at least this fraction of
    the progress made (smoothed loss at step ~10 minus the best), so that a loss near zero rising
    from 0.001 to 0.004 on noise is not called an explosion.
    """

    explosion_factor: float = 4.0
    grad_spike_factor: float = 10.0
    warmup_steps: int = 20
    oscillation_window: int = 20
    enabled: tuple[str, ...] = KINDS
    quiet_steps: int = 50
    min_rise: float = 0.25

    def __post_init__(self) -> None:
        self.enabled = tuple(self.enabled)
        unknown = [k for k in self.enabled if k not in KINDS]
        if unknown:
            raise ConfigError(f"unknown guard check {unknown[0]!r}; choose from {', '.join(KINDS)}")
        if not self.explosion_factor > 1.0:
            raise ConfigError(f"explosion_factor must be above 1, not {self.explosion_factor}")
        if not self.grad_spike_factor > 1.0:
            raise ConfigError(f"grad_spike_factor must be above 1, not {self.grad_spike_factor}")
        if self.warmup_steps < 0 or self.quiet_steps < 0:
            raise ConfigError("warmup_steps and quiet_steps must be 0 or more")
        if self.oscillation_window < 8:
            raise ConfigError(f"oscillation_window must be at least 8 steps, not {self.oscillation_window}")
        if not 0.0 <= self.min_rise < 1.0:
            raise ConfigError(f"min_rise must be between 0 and 1, not {self.min_rise}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["enabled"] = list(self.enabled)
        return d


# The running state, in the order state_dict() saves it.
_STATE = ("_n", "_avg", "_corr", "_best", "_thr", "_loss_ref", "_lcap", "_gsq", "_gthr2", "_grad_ref",
          "_prev", "_prevd", "_i", "_cnt", "_flags", "_swings",
          "_rearm_nonfinite", "_rearm_explosion", "_rearm_spike", "_rearm_oscillation")


class DivergenceGuard:
    """Watches ``(loss, grad_norm)`` per step and returns a :class:`Detection` when training goes wrong.

    Feed it every step in order with :meth:`update` (or a run of steps with :meth:`update_many`);
    call :meth:`reset` after rolling the model back, since the history no longer applies.
    """

    __slots__ = ("config", "_warm", "_osc_from", "_k", "_m2", "_cap", "_quiet", "_w", "_need_alt",
                 "_need_grow", "_check_nonfinite", "_check_explosion", "_check_spike", "_check_oscillation") + _STATE

    def __init__(self, config: GuardConfig | None = None):
        self.config = config if config is not None else GuardConfig()
        self._configure()
        self.reset()

    def _configure(self) -> None:
        c = self.config
        self._warm = c.warmup_steps
        self._w = w = c.oscillation_window
        self._osc_from = max(c.warmup_steps, w + 1)
        self._k = c.explosion_factor
        self._m2 = c.grad_spike_factor ** 2
        self._cap = OUTLIER_CAP * c.explosion_factor
        self._quiet = c.quiet_steps
        self._need_alt = math.ceil(ALTERNATION_SHARE * w - 1e-9)
        self._need_grow = math.ceil(GROWING_SHARE * (w - 2) - 1e-9)
        on = set(c.enabled)
        self._check_nonfinite = "nonfinite" in on
        self._check_explosion = "loss_explosion" in on
        self._check_spike = "grad_spike" in on
        self._check_oscillation = "oscillation" in on

    def reset(self) -> None:
        """Forget the history (after a roll-back); keep the config."""
        inf = math.inf
        self._n = 0  # finite steps seen
        self._avg = 0.0
        self._corr = 1.0  # BETA ** n, for debiasing
        self._best = inf  # best smoothed loss
        self._thr = inf  # explosion threshold derived from it
        self._lcap = inf  # the most one step's loss may add to the smoothed loss
        self._loss_ref = 0.0  # smoothed loss when the best started being tracked
        self._gsq = 0.0  # EMA of the squared gradient norm
        self._gthr2 = inf  # grad-spike threshold for the next step, squared
        self._grad_ref = 0.0
        self._prev = math.nan
        self._prevd = 0.0
        self._i = 0
        self._cnt = 0
        self._flags = [0] * self._w  # 1 where a loss change reversed the previous one
        self._swings = [math.nan] * self._w  # |loss change|
        self._rearm_nonfinite = self._rearm_explosion = self._rearm_spike = self._rearm_oscillation = 0

    # ---- the per-step call ----------------------------------------------------------------------
    def update(self, step: int, loss: float, grad_norm: float) -> Detection | None:
        """Take step ``step``'s loss and gradient norm (floats); a Detection when something is wrong."""
        if loss - loss != 0.0 or grad_norm - grad_norm != 0.0:  # NaN or +-inf (inf - inf is NaN)
            return self._nonfinite(step, loss, grad_norm)
        n = self._n + 1
        self._n = n
        corr = self._corr * 0.98  # BETA, spelled out: a literal is faster than a global
        self._corr = corr
        avg = self._avg = 0.98 * self._avg + 0.02 * (loss if loss <= self._lcap else self._lcap)
        # oscillation bookkeeping: does this change reverse the last one, and how big is it
        d = loss - self._prev
        self._prev = loss
        flag = 1 if d * self._prevd < 0.0 else 0
        self._prevd = d
        i = self._i
        flags = self._flags
        cnt = self._cnt + flag - flags[i]
        self._cnt = cnt
        flags[i] = flag
        self._swings[i] = d if d >= 0.0 else -d
        i += 1
        self._i = 0 if i == self._w else i
        det = None
        gsq = grad_norm * grad_norm
        if n > self._warm:
            if gsq > self._gthr2:
                det = self._grad_spike(step, grad_norm, n)
                gsq = self._gthr2  # a spike must not inflate the average it is measured against
            if avg > self._thr * (1.0 - corr) and det is None:  # smoothed loss > threshold, no division
                det = self._explosion(step, loss, avg / (1.0 - corr), n)
            if cnt >= self._need_alt and not n & 3 and det is None:
                det = self._oscillation(step, n, avg / (1.0 - corr))
        gms = self._gsq = 0.98 * self._gsq + 0.02 * gsq
        smooth = avg / (1.0 - corr)
        if n >= self._warm:
            self._gthr2 = self._m2 * gms / (1.0 - corr)
            self._lcap = self._cap * smooth if smooth > 0.0 else math.inf
        if smooth < self._best and n >= BEST_FROM:
            self._new_best(smooth, n)
        return det

    def update_many(self, first_step: int, losses: Any, grad_norms: Any) -> Detection | None:
        """Feed consecutive steps from ``first_step`` on (e.g. one device flush); the first Detection.

        Steps after a detection are not fed: the caller acts on the detection first.
        """
        update = self.update
        for j, (lf, gn) in enumerate(zip(_floats(losses), _floats(grad_norms))):
            det = update(first_step + j, lf, gn)
            if det is not None:
                return det
        return None

    @property
    def smoothed_loss(self) -> float | None:
        """The debiased EMA of the loss (None before the first finite step)."""
        return self._avg / (1.0 - self._corr) if self._n else None

    @property
    def best_loss(self) -> float | None:
        """The best smoothed loss so far (None until it is tracked, from step ~10)."""
        return self._best if self._best < math.inf else None

    # ---- rare paths -------------------------------------------------------------------------------
    def _new_best(self, smooth: float, n: int) -> None:
        if self._best == math.inf:
            self._loss_ref = smooth
            self._grad_ref = math.sqrt(self._gsq / (1.0 - self._corr))
        self._best = smooth
        self._thr = smooth + (self._k - 1.0) * abs(smooth)

    def _nonfinite(self, step: int, loss: float, grad_norm: float) -> Detection | None:
        if not self._check_nonfinite:
            return None
        n = self._n
        fire = n >= self._rearm_nonfinite
        self._rearm_nonfinite = n + self._quiet + 1
        if not fire:
            return None
        if not math.isfinite(loss):
            what = f"the loss became {_word(loss)} at step {step}"
            if math.isfinite(grad_norm):
                what += f" (gradient norm {grad_norm:.3g})"
            else:
                what += f", and the gradient norm {_word(grad_norm)}"
        else:
            what = f"the gradient norm became {_word(grad_norm)} at step {step} while the loss was {loss:.4g}"
        if self._best < math.inf:
            what += f"; the best smoothed loss so far was {self._best:.4g}"
        return Detection("nonfinite", step, what, _EXPLANATIONS["nonfinite"],
                         {"loss": _plain(loss), "grad_norm": _plain(grad_norm), "best": _plain(self._best)})

    def _grad_spike(self, step: int, grad_norm: float, n: int) -> Detection | None:
        if not self._check_spike:
            return None
        ref = math.sqrt(self._gsq / (1.0 - self._corr / BETA))  # before this step
        if grad_norm - ref <= GRAD_FLOOR * self._grad_ref:
            return None
        fire = n >= self._rearm_spike
        self._rearm_spike = n + self._quiet
        if not fire:
            return None
        ratio = grad_norm / ref if ref > 0 else math.inf
        msg = (f"the gradient norm jumped to {grad_norm:.3g} at step {step}, {ratio:.1f}x its recent "
               f"typical size {ref:.3g} (root mean square over the last ~50 steps)")
        return Detection("grad_spike", step, msg, _EXPLANATIONS["grad_spike"],
                         {"value": grad_norm, "reference": ref, "ratio": ratio})

    def _explosion(self, step: int, loss: float, smooth: float, n: int) -> Detection | None:
        if not self._check_explosion:
            return None
        best = self._best
        if smooth - best <= self.config.min_rise * (self._loss_ref - best):
            return None
        fire = n >= self._rearm_explosion
        self._rearm_explosion = n + self._quiet
        if not fire:
            return None
        if best > 0:
            ratio = smooth / best
            how = f"{ratio:.1f}x its best smoothed value {best:.3g}"
        else:
            ratio = math.inf if best == 0 else (smooth - best) / -best
            how = f"{smooth - best:.3g} above its best smoothed value {best:.3g}"
        msg = f"the smoothed loss rose to {smooth:.3g} (this step {loss:.3g}), {how}, at step {step}"
        return Detection("loss_explosion", step, msg, _EXPLANATIONS["loss_explosion"],
                         {"value": smooth, "loss": loss, "reference": best, "ratio": ratio})

    def _oscillation(self, step: int, n: int, smooth: float) -> Detection | None:
        if not self._check_oscillation or n <= self._osc_from:
            return None
        w = self._w
        i = self._i  # the oldest entry
        s = self._swings[i:] + self._swings[:i]
        growing = sum(1 for a, b in zip(s, s[2:]) if b > a)
        half = w // 2
        first = sum(s[:half])
        second = sum(s[w - half:])
        if growing < self._need_grow or not second >= SWING_GROWTH * first:
            return None
        fire = n >= self._rearm_oscillation
        self._rearm_oscillation = n + self._quiet
        if not fire:
            return None
        lo, hi = first / half, second / half
        growth = hi / lo if lo > 0 else math.inf
        msg = (f"the loss went up and down on {self._cnt} of the last {w} steps (to step {step}), "
               f"and the swings grew {growth:.1f}x, from {lo:.3g} to {hi:.3g} per step; the smoothed "
               f"loss is {smooth:.4g}")
        return Detection("oscillation", step, msg, _EXPLANATIONS["oscillation"],
                         {"reversals": float(self._cnt), "window": float(w), "swing_before": lo,
                          "swing_after": hi, "ratio": growth})

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the guard knows, as plain Python values (for checkpoints)."""
        d: dict[str, Any] = {name.lstrip("_"): getattr(self, name) for name in _STATE}
        d["flags"] = list(self._flags)
        d["swings"] = list(self._swings)
        d["config"] = self.config.to_dict()
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (its config too)."""
        if "config" in state:
            cfg = dict(state["config"])
            cfg["enabled"] = tuple(cfg.get("enabled", KINDS))
            self.config = GuardConfig(**cfg)
            self._configure()
        self.reset()
        for name in _STATE:
            key = name.lstrip("_")
            if key in state:
                value = state[key]
                setattr(self, name, list(value) if isinstance(value, (list, tuple)) else value)
        if len(self._flags) != self._w or len(self._swings) != self._w:
            raise ConfigError("the saved guard state does not match its oscillation window")


def _floats(values: Any) -> list[float]:
    tolist = getattr(values, "tolist", None)
    return [float(v) for v in (tolist() if tolist is not None else values)]


def _word(x: float) -> str:
    return "NaN" if math.isnan(x) else ("+inf" if x > 0 else "-inf")


def _plain(x: float) -> float | None:
    return x if math.isfinite(x) else None
