"""Checkpoints: everything needed to continue a run exactly from a step.

A checkpoint holds the model and optimizer state, the schedule's state, every RNG (Python, NumPy,
torch CPU and CUDA), the step, the epoch and the position in the epoch (with the RNG state at the
epoch's start, so the data order can be rebuilt). The training data's own generators (a
``DataLoader(generator=g)``, a sampler's ``generator``) are saved too, at the epoch's start and at
the checkpoint: they decide the data order as much as the global RNG does. Files are written with
``torch.save`` beside the run store and read back with ``weights_only=True``: only tensors and plain
Python values inside. :func:`check` proves a loaded checkpoint usable before anything acts on it.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

#: Format 2 added the data generators (``data_rng``); format 1 files still load (without them).
FORMAT = 2
READABLE_FORMATS = (1, 2)
#: Where a DataLoader keeps the generators that decide its data order (torch's own attribute names).
_GENERATOR_PATHS = ("generator", "sampler.generator", "batch_sampler.generator", "batch_sampler.sampler.generator")


def capture_rng() -> dict[str, Any]:
    """The state of every RNG lrviz seeds, as weights_only-loadable values."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Put every RNG back as ``capture_rng`` found it."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location=cuda moved it
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def data_generators(data: Any) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects that decide the order of ``data`` (a DataLoader), by attribute path.

    Found without iterating (which would draw from them): the loader's ``generator`` (its workers'
    base seed), its sampler's and its batch sampler's. One generator shared by several is listed once.
    """
    out: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    for path in _GENERATOR_PATHS:
        obj = data
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, torch.Generator) and id(obj) not in seen:
            seen.add(id(obj))
            out[path] = obj
    return out


def capture_generators(gens: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The states of ``gens`` (weights_only-loadable ByteTensors)."""
    return {path: g.get_state() for path, g in gens.items()}


def restore_generators(gens: Mapping[str, torch.Generator], states: Mapping[str, torch.Tensor] | None) -> None:
    """Put the generators back as ``capture_generators`` found them (those both sides know)."""
    for path, state in (states or {}).items():
        g = gens.get(path)
        if g is not None:
            g.set_state(state.cpu())


@dataclass
class CheckpointInfo:
    """Where a checkpoint is and what it holds, as recorded in a 'checkpoint' event."""

    path: Path
    step: int  # the next step to run: steps 0..step-1 are done
    reason: str
    loss: float | None = None
    #: Where its event sits in the engine's event list (-1: before all of them, e.g. a fork's origin):
    #: orders it against interventions recorded at the same step.
    seq: int = -1


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temp file in the same folder, then rename (ConfigError naming a path that
    cannot be written)."""
    from .export import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(payload, f), durable=False)


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; ConfigError when it is missing or not one."""
    return load_bytes(read_bytes(path), path, map_location)


def read_bytes(path: str | Path) -> bytes:
    """A checkpoint file's bytes; ConfigError when it is missing or unreadable."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint {p} does not exist (deleted with its run?)")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read checkpoint {p}: {exc.strerror or exc}") from None


def load_bytes(data: bytes, path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint from the bytes of the file at ``path`` (read here, or on another rank), with
    ``weights_only=True``; ConfigError when it is not one."""
    p = Path(path)
    try:
        out = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {p}: {exc}") from None
    if not isinstance(out, dict) or out.get("format") not in READABLE_FORMATS:
        raise ConfigError(f"{p} is not an lrviz checkpoint (or from another version)")
    return out


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(data: Mapping[str, Any], path: str | Path, *, step: int | None = None, groups: int | None = None,
          data_gens: Mapping[str, torch.Generator] | None = None, batches_per_epoch: int | None = None) -> None:
    """Refuse a checkpoint that cannot be continued from, before anything acts on it.

    Checks every field a resume or fork reads: the step (equal to ``step`` when given, the step its
    event names), epoch and position in the epoch (within ``batches_per_epoch`` when known), the
    learning rates (``groups`` of them), the schedule's state, and every RNG state (tried, then put
    back). Raises one ConfigError naming the file and the field.
    """
    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"checkpoint {path} is damaged: {field} {why}; "
                           "choose another checkpoint (or fork from an earlier step)")

    for key in ("step", "epoch", "batch_in_epoch"):
        v = data.get(key)
        if not _whole(v) or v < 0:
            raise bad(f"'{key}'", f"is {v!r}, not a whole number >= 0")
    if step is not None and data["step"] != step:
        raise bad("'step'", f"is {data['step']}, but its run recorded it at step {step}")
    if batches_per_epoch is not None and data["batch_in_epoch"] > batches_per_epoch:
        raise bad("'batch_in_epoch'", f"is {data['batch_in_epoch']}, but the training data has "
                  f"{batches_per_epoch} batches an epoch (did build_data change?)")
    t = data.get("time", 0.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise bad("'time'", f"is {t!r}, not a number of seconds >= 0")
    if not isinstance(data.get("model"), Mapping) or not all(
            isinstance(v, torch.Tensor) for v in data["model"].values()):
        raise bad("'model'", "is not a model state (names to tensors)")
    opt = data.get("optimizer")
    if not isinstance(opt, Mapping) or not isinstance(opt.get("state"), Mapping) \
            or not isinstance(opt.get("param_groups"), list):
        raise bad("'optimizer'", "is not an optimizer state")
    lrs = data.get("lrs")
    if not isinstance(lrs, (list, tuple)) or not lrs or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in lrs):
        raise bad("'lrs'", f"is {lrs!r}, not a list of learning rates >= 0")
    if groups is not None and len(lrs) != groups:
        raise ConfigError(f"checkpoint {path} has {len(lrs)} parameter group(s) and the script's optimizer "
                          f"now has {groups}: it belongs to another version of the script")
    sched = data.get("schedule")
    if sched is not None:
        from .schedules import Schedule

        if not isinstance(sched, Mapping) or not _whole(sched.get("start")) or sched["start"] < 0 \
                or not isinstance(sched.get("state"), Mapping):
            raise bad("'schedule'", "is not a schedule state")
        try:
            Schedule.from_state_dict(sched["state"])
        except Exception as exc:  # any malformed value inside
            raise bad("'schedule'", f"cannot be restored ({exc})") from None
    _check_step_settings(data, bad)
    now = capture_rng()
    try:
        for key in ("rng", "epoch_rng"):
            try:
                restore_rng(data[key])
            except Exception as exc:  # KeyError, TypeError, ValueError, RuntimeError: all mean damaged
                raise bad(f"'{key}'", f"is not a saved RNG state ({type(exc).__name__}: {exc})") from None
    finally:
        restore_rng(now)
    drng = data.get("data_rng")
    if drng is None:
        return
    if not isinstance(drng, Mapping) or not all(isinstance(drng.get(k), Mapping) for k in ("epoch", "now")):
        raise bad("'data_rng'", "is not a saved data-generator state")
    for when in ("epoch", "now"):
        for name, state in drng[when].items():
            g = (data_gens or {}).get(name)
            if g is None:
                continue
            keep = g.get_state()
            try:
                g.set_state(state.cpu())
            except Exception as exc:
                raise bad(f"'data_rng' ({name})", f"is not a generator state ({type(exc).__name__}: {exc})") from None
            finally:
                g.set_state(keep)


def _check_step_settings(data: Mapping[str, Any], bad: Any) -> None:
    """The clipping threshold, the fp16 gradient scaler and the clipped/skipped counts (absent before them)."""
    clip = data.get("clip_grad_norm")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip)
                             or clip <= 0):
        raise bad("'clip_grad_norm'", f"is {clip!r}, not a gradient-norm threshold > 0 (or None)")
    scaler = data.get("scaler")
    if scaler is not None:
        scale = scaler.get("scale") if isinstance(scaler, Mapping) else None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise bad("'scaler'", "is not a gradient scaler's state (its scale must be a number > 0)")
    watch = data.get("step_watch")
    if watch is not None and (not isinstance(watch, Mapping) or not all(
            _whole(watch.get(k)) and watch[k] >= 0 for k in ("clipped", "skipped"))):
        raise bad("'step_watch'", "is not a count of clipped and skipped steps")


# ---- the checkpoints of one run: keeping, pruning, choosing one to roll back to ----------------------
#: A change of settings (set LR, schedule, momentum/weight decay, clipping) at most this many steps before a
#: divergence the guard caught is taken as its cause: a roll-back restores a checkpoint from before it.
CAUSE_STEPS = 500
#: The events that change a run's settings: one of them may be what led to a divergence.
SETTING_EVENTS = ("set_lr", "set_schedule", "set_hyperparams", "set_clip")


class Checkpoints:
    """The checkpoints a run keeps (oldest first) in ``folder``: saved, pruned, and chosen for roll-backs.

    ``keep`` periodic checkpoints are kept, plus the one before each recent change of settings (what
    a roll-back restores if that change leads to a divergence) and every other kind.
    """

    def __init__(self, folder: Path | None, keep: int = 5):
        self.folder = folder
        self.keep = keep
        self.items: list[CheckpointInfo] = []
        self.last_step = -1

    def add(self, info: CheckpointInfo) -> None:
        self.items.append(info)
        self.last_step = info.step

    def save(self, payload: dict[str, Any], reason: str, loss: float | None, events: list[Any]) -> CheckpointInfo:
        """Write ``payload`` as the checkpoint of its step; prune old periodic ones."""
        assert self.folder is not None
        step = int(payload["step"])
        path = self.folder / f"step-{step:09d}-{reason}.pt"
        save(path, payload)
        info = CheckpointInfo(path, step, reason, loss, seq=len(events))
        self.add(info)
        return info

    def prune(self, events: list[Any], step: int) -> None:
        keep = self.rollback_targets(events, step)
        periodic = [c for c in self.items if c.reason == "periodic" and c.seq not in keep]
        for old in periodic[:-self.keep] if self.keep else []:
            try:
                old.path.unlink()
            except OSError:
                pass
            self.items.remove(old)

    def rollback_targets(self, events: list[Any], step: int) -> set[int]:
        """The ``seq`` of each latest checkpoint before a change of settings of the last CAUSE_STEPS
        steps: what a roll-back restores if that change leads to a divergence (kept from pruning)."""
        changes = []
        for i in range(len(events) - 1, -1, -1):
            e = events[i]
            if e.step < step - CAUSE_STEPS:
                break
            if e.kind in SETTING_EVENTS:
                changes.append(i)
        out = set()
        for i in changes:
            before = [c.seq for c in self.items if c.seq < i]
            if before:
                out.add(before[-1])
        return out

    def good(self, det: Any, events: list[Any], *, margin: int, start_step: int) -> CheckpointInfo:
        """The latest checkpoint from before the trouble the guard saw in ``det`` (or the latest one).

        Before the trouble means: saved before the guard's detection window (``margin`` steps), and
        before the change of settings that led to it (the latest one within CAUSE_STEPS steps before
        the detection, since the last roll-back). One saved at or after the detection is never chosen.
        """
        usable = [c for c in self.items if c.path.exists() and (c.loss is None or math.isfinite(c.loss))]
        if det is None:
            if usable:
                return usable[-1]
            raise ConfigError("there is no checkpoint to roll back to (checkpoints are kept only for runs "
                              "saved in a store)")
        limit = max(det.step - margin, start_step)
        cause = cause_of(det, events)
        before = [c for c in usable if c.step <= limit and (cause is None or c.seq < cause)]
        if before:
            return before[-1]
        what = f"the change at step {events[cause].step} that led to it" if cause is not None else f"step {limit}"
        raise ConfigError(f"there is no checkpoint from before the trouble at step {det.step} (before {what}) "
                          "to roll back to; save checkpoints more often (--checkpoint-every N)")

    def forget_after(self, info: CheckpointInfo) -> None:
        """After a roll-back to ``info``: the checkpoints saved later belong to the abandoned course."""
        self.items = [c for c in self.items if c.seq <= info.seq]

    def find(self, path: Path) -> CheckpointInfo | None:
        return next((c for c in self.items if c.path == path), None)


def cause_of(det: Any, events: list[Any]) -> int | None:
    """The index in ``events`` of the change of settings that led to ``det``, if one did."""
    oldest = det.step - CAUSE_STEPS
    for i in range(len(events) - 1, -1, -1):
        e = events[i]
        if e.kind == "rollback" or e.step < oldest:
            break
        if e.kind in SETTING_EVENTS and e.step <= det.step:
            return i
    return None
