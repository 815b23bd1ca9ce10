"""Interventions: changes to a run's settings that take effect at a given step.

The app sends them live (they take effect at the next step); ``--at STEP:lr=X`` and replays
schedule them ahead. Both go through the same engine code path, and each applied one is recorded
as an event, so a run can be replayed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .config import parse_clip, parse_lr
from .errors import ConfigError

KINDS = ("set_lr", "set_schedule", "set_hyperparams", "set_clip", "rollback")
AT_KEYS = {"lr": "set_lr", "schedule": "set_schedule", "momentum": "set_hyperparams",
           "weight_decay": "set_hyperparams", "clip_grad_norm": "set_clip"}


@dataclass(order=True)
class Intervention:
    """``kind`` with ``data`` applied just before step ``step``."""

    step: int
    kind: str = field(compare=False)
    data: dict[str, Any] = field(compare=False, default_factory=dict)


def check(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalise an intervention's data; raise ConfigError naming what is wrong."""
    if kind == "set_lr":
        return {"lr": parse_lr(data.get("lr"))}
    if kind == "set_schedule":
        spec = data.get("spec")
        if spec in (None, "", "none", "constant"):
            return {"spec": None}
        from .schedules import parse_schedule

        return {"spec": str(parse_schedule(str(spec)))}
    if kind == "set_hyperparams":
        out: dict[str, Any] = {}
        for key in ("momentum", "weight_decay"):
            if data.get(key) is None:
                continue
            try:
                v = float(data[key])
            except (TypeError, ValueError):
                raise ConfigError(f"{key.replace('_', ' ')} must be a number, not {data[key]!r}") from None
            if not math.isfinite(v) or v < 0 or (key == "momentum" and v >= 1):
                rng = "[0, 1)" if key == "momentum" else ">= 0"
                raise ConfigError(f"{key.replace('_', ' ')} must be {rng}, not {data[key]!r}")
            out[key] = v
        if not out:
            raise ConfigError("set_hyperparams needs momentum and/or weight_decay")
        return out
    if kind == "set_clip":
        if "clip_grad_norm" not in data:
            raise ConfigError("set_clip needs clip_grad_norm: a number > 0, or None to stop clipping")
        return {"clip_grad_norm": parse_clip(data["clip_grad_norm"])}
    if kind == "rollback":
        try:
            factor = float(data.get("lr_factor", 0.1))
        except (TypeError, ValueError):
            raise ConfigError(f"roll-back LR factor must be a number, not {data.get('lr_factor')!r}") from None
        if not math.isfinite(factor) or not 0 < factor <= 1:
            raise ConfigError(f"roll-back LR factor must be in (0, 1], not {factor!r}")
        out = {"lr_factor": factor}
        if data.get("path"):
            out["path"] = str(data["path"])
        return out
    raise ConfigError(f"unknown intervention {kind!r}; known: {', '.join(KINDS)}")


def step_number(text: str, where: str, hint: str = "") -> int:
    """``text`` as a step number, or a ConfigError that starts with ``where`` (the flag and its value)."""
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a step number{hint}") from None


def parse_at(text: str) -> Intervention:
    """Parse ``STEP:lr=X``, ``STEP:schedule=SPEC``, ``STEP:momentum=M``, ``STEP:weight_decay=W`` or
    ``STEP:clip_grad_norm=X`` (``off`` stops clipping)."""
    head, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    example = "use STEP:lr=X or STEP:schedule=SPEC, e.g. 100:lr=0.01"
    if not sep or not eq:
        raise ConfigError(f"--at {text!r}: {example}")
    step = step_number(head, f"--at {text!r}", f"; {example}")
    if step < 0:
        raise ConfigError(f"--at {text!r}: the step must be >= 0")
    key = key.strip().replace("-", "_")
    if key not in AT_KEYS:
        raise ConfigError(f"--at {text!r}: unknown setting {key!r}; known: {', '.join(AT_KEYS)}")
    kind = AT_KEYS[key]
    raw = {"spec": value} if kind == "set_schedule" else {key: value}
    try:
        return Intervention(step, kind, check(kind, raw))
    except ConfigError as exc:
        raise ConfigError(f"--at {text!r}: {exc}") from None


def from_events(events: list[Any]) -> list[Intervention]:
    """The interventions recorded in a run's events, in the order they were applied (without the
    guard's automatic roll-backs, which a run with the same settings makes again by itself)."""
    out = []
    for e in events:
        if e.kind not in KINDS:
            continue
        if e.kind == "rollback" and e.data.get("auto"):
            continue  # the guard's own roll-back: the same run's guard does it again by itself
        data = dict(e.data)
        if e.kind == "rollback":  # replay restores the very checkpoint the original rolled back to
            data = {"lr_factor": data.get("lr_factor", 0.1), "path": data.get("path")}
        out.append(Intervention(e.step, e.kind, data))
    return out
