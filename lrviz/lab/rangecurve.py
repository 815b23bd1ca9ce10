"""A range test's curve and what is read from it, with no torch: the records (:class:`RangeTestResult`,
:class:`RangeTestProgress`, a confirmation's :class:`Trial` and :class:`Confirmation`), the smoothing,
the suggestions (:func:`suggest`, fastai's :func:`valley_index`), the rates a confirmation tries
(:func:`candidates`) and how it judges them.

:mod:`lrviz.lab.rangetest` runs the test and the confirmation on a model (and re-exports all of this);
the app, which never imports torch, reads a test's result here (``RangeTestResult.from_dict`` of what
a run sends).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import parse_positive
from ..errors import ConfigError

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Suggestions:
        """The suggestions :meth:`to_dict` described."""
        return cls(*(_rate(d.get(m)) for m in METHODS), chosen=str(d.get("chosen") or "valley"),
                   reason=d.get("reason"), confirmed=_rate(d.get("confirmed")))


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        """The trial :meth:`to_dict` described (without its held-out losses, which it leaves out)."""
        end = d.get("end")
        return cls(float(d["lr"]), str(d.get("source") or ""), _floats(d.get("losses")), bool(d.get("diverged")),
                   _number(d.get("start")), math.inf if end is None else _number(end))


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Confirmation:
        """The confirmation :meth:`to_dict` described; its winner is the trial of the winning rate."""
        trials = [Trial.from_dict(t) for t in d.get("trials") or ()]
        won = d.get("winner")
        winner = next((t for t in trials if won is not None and t.lr == float(won)
                       and t.source == (d.get("winner_source") or t.source)), None)
        return cls(trials, int(d.get("steps") or 0), winner, str(d.get("reason") or ""), _number(d.get("seconds")))


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _number(v: Any) -> float:
    """A float from a plain value: None is NaN; "nan", "inf" and "-inf" (how non-finite numbers
    travel as JSON) are themselves."""
    return math.nan if v is None else float(v)


def _rate(v: Any) -> float | None:
    return None if v is None else float(v)


def _floats(values: Any) -> np.ndarray:
    return np.array([_number(v) for v in values or ()], dtype=np.float64)


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RangeTestResult:
        """The result :meth:`to_dict` described, with its rows (``lrs``, ``losses``, ``smoothed``): what a
        live run's range-test ack carries."""
        c = d.get("confirmation")
        return cls(_floats(d.get("lrs")), _floats(d.get("losses")), _floats(d.get("smoothed")),
                   bool(d.get("stopped_early")), str(d.get("stop_reason") or ""),
                   Suggestions.from_dict(d.get("suggestions") or {}), start=_number(d.get("start")),
                   end=_number(d.get("end")), steps=int(d.get("steps") or 0), beta=_number(d.get("beta", 0.98)),
                   stop_factor=_number(d.get("stop_factor", 4.0)), seconds=_number(d.get("seconds")),
                   confirmation=Confirmation.from_dict(c) if c else None,
                   confirm_note=str(d.get("confirm_note") or ""))


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
    s = parse_positive(start, "range test start lr")
    e = parse_positive(end, "range test end lr")
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
