"""Run configuration: what the controls of the app and the flags of the CLI set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_EPOCHS = 10
DIVERGENCE_POLICIES = ("stop", "pause", "rollback", "off")
#: Mixed precision: autocast to bfloat16 (any device with bf16 autocast, the CPU included) or float16
#: with a gradient scaler (CUDA only). None: full precision.
AMP_CHOICES = ("bf16", "fp16")
#: Words that mean "no value" for the settings that can be off (mixed precision, clipping).
OFF_WORDS = ("", "off", "none", "no")


def parse_positive(value: Any, what: str, not_a_number: str | None = None) -> float:
    """A finite number > 0 from text or a number; ``not_a_number`` is the message when it is no number
    at all (a bool, a word), by default the same as for one out of range."""
    bad = f"{what} must be a finite number > 0, not {value!r}"
    if isinstance(value, bool):
        raise ConfigError(not_a_number or bad)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(not_a_number or bad) from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(bad)
    return v


def parse_lr(value: Any, what: str = "learning rate") -> float:
    """A learning rate from text or a number: finite and > 0 (``"3e-4"`` is fine)."""
    return parse_positive(value, what, f"{what} must be a positive number like 0.01 or 3e-4, not {value!r}")


def parse_finite(value: Any, what: str, at_least: float | None = None) -> float:
    """A finite number (``>= at_least`` when given) from text or a number; ``what`` names it in the message."""
    need = "" if at_least is None else f" >= {at_least:g}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number{need}, not {value!r}") from None
    if not math.isfinite(v) or (at_least is not None and v < at_least):
        raise ConfigError(f"{what} must be a finite number{need}, not {value!r}")
    return v


def _non_negative(value: Any, what: str) -> float:
    return parse_finite(value, what, at_least=0)


def _positive_int(value: Any, what: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a whole number > 0, not {value!r}")
    try:
        v = int(value)
        if v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a whole number > 0, not {value!r}") from None
    if v <= 0:
        raise ConfigError(f"{what} must be a whole number > 0, not {value!r}")
    return v


def parse_amp(value: Any) -> str | None:
    """Mixed precision from text: ``bf16``, ``fp16``, or None for full precision (``off``, ``none``, ``fp32``)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in (*OFF_WORDS, "fp32", "float32"):
        return None
    text = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(text, text)
    if text not in AMP_CHOICES:
        raise ConfigError(f"unknown mixed precision {value!r}; choose bf16, fp16 or off")
    return text


def parse_clip(value: Any) -> float | None:
    """A gradient-clipping threshold (the largest gradient norm let through): a number > 0, or None for
    no clipping (``off``, ``none``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in OFF_WORDS):
        return None
    what = f"clip grad norm must be a number > 0 such as 1.0 (or off), not {value!r}"
    if isinstance(value, bool):
        raise ConfigError(what)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(what) from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(what)
    return v


#: The seeds torch.manual_seed accepts (NumPy gets the seed modulo 2**32).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _seed(value: Any) -> int:
    what = f"seed must be a whole number from {SEED_MIN} to {SEED_MAX}, not {value!r}"
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(what)
    try:
        seed = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(what) from None
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ConfigError(what)
    return seed


@dataclass
class RunConfig:
    """Every setting of one training run. ``validated()`` returns a checked copy or raises ConfigError."""

    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    epochs: int | None = None
    steps: int | None = None
    schedule: str | None = None
    batch_size: int | None = None
    seed: int = 0
    eval_every: int | None = None
    device: str = "auto"
    params: dict[str, Any] = field(default_factory=dict)
    #: Save a checkpoint every N steps (and at every pause) when the run has a store; None: only at pauses.
    checkpoint_every: int | None = None
    #: What the divergence guard does: 'stop' (headless default), 'pause' (the app), 'rollback' (to the
    #: last good checkpoint with LR/10, automatically), or 'off' (only NaN/inf loss stops the run).
    divergence: str = "stop"
    #: Stop when the validation loss has not improved for this many validation passes.
    early_stopping: int | None = None
    #: At most this many steps a second (slow motion, to watch a fast run); None: full speed.
    pace: float | None = None
    #: Mixed precision: 'bf16' or 'fp16' (autocast on the run's device; fp16 with a gradient scaler, CUDA
    #: only); None: full precision.
    amp: str | None = None
    #: Micro-batches per optimizer update (gradient accumulation): a step is one update over this many batches.
    accumulate: int = 1
    #: Clip the gradient norm to this value before each update (torch's clip_grad_norm_); None: no clipping.
    clip_grad_norm: float | None = None
    #: How a torchrun run was spread (world size, backend, every rank's device, the hosts): recorded
    #: by the run, not a setting; None (and absent from ``to_dict``) for a run in one process.
    distributed: dict[str, Any] | None = None

    def validated(self) -> RunConfig:
        """Check every field; raise ConfigError naming the setting and the problem."""
        c = RunConfig(**asdict(self))
        c.lr = parse_lr(c.lr)
        name = str(c.optimizer).lower()
        if name not in OPTIMIZER_NAMES:
            raise ConfigError(f"unknown optimizer {c.optimizer!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
        c.optimizer = name
        c.momentum = _non_negative(c.momentum, "momentum")
        if c.momentum >= 1:
            raise ConfigError(f"momentum must be in [0, 1), not {c.momentum!r}")
        if c.nesterov and (c.optimizer != "sgd" or c.momentum <= 0):
            raise ConfigError("nesterov needs the sgd optimizer with momentum > 0")
        c.weight_decay = _non_negative(c.weight_decay, "weight decay")
        c.epochs = _positive_int(c.epochs, "epochs")
        c.steps = _positive_int(c.steps, "steps")
        c.batch_size = _positive_int(c.batch_size, "batch size")
        c.eval_every = _positive_int(c.eval_every, "eval every")
        c.checkpoint_every = _positive_int(c.checkpoint_every, "checkpoint every")
        c.early_stopping = _positive_int(c.early_stopping, "early stopping patience")
        if c.pace is not None:
            c.pace = _non_negative(c.pace, "pace (steps per second)") or None
        c.amp = parse_amp(c.amp)
        c.accumulate = _positive_int(1 if c.accumulate is None else c.accumulate, "accumulate (micro-batches "
                                     "per update)", allow_none=False)
        c.clip_grad_norm = parse_clip(c.clip_grad_norm)
        if c.divergence not in DIVERGENCE_POLICIES:
            raise ConfigError(f"unknown divergence policy {c.divergence!r}; choose one of "
                              f"{', '.join(DIVERGENCE_POLICIES)}")
        c.seed = _seed(c.seed)
        if c.device not in DEVICE_CHOICES:
            raise ConfigError(f"unknown device {c.device!r}; choose one of {', '.join(DEVICE_CHOICES)}")
        if c.schedule in ("", "none", "constant"):
            c.schedule = None
        if c.schedule is not None:
            from .schedules import parse_schedule

            c.schedule = str(parse_schedule(str(c.schedule)))
        if c.epochs is None and c.steps is None:
            c.epochs = DEFAULT_EPOCHS
        return c

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as stored with the run."""
        d = asdict(self)
        if d["distributed"] is None:
            del d["distributed"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a stored or scripted dict; unknown keys are a ConfigError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)

    def merged(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with the non-None values of ``overrides`` applied."""
        d = asdict(self)
        for k, v in overrides.items():
            if v is not None:
                if k not in d:
                    raise ConfigError(f"unknown setting {k!r}")
                d[k] = v
        return RunConfig(**d)
