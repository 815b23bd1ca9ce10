"""Continuing a run from a checkpoint: a fork (a new child run) or a resume (the same run).

The engine restores weights, optimizer, rates and RNG from the checkpoint; this module does the rest
of the bookkeeping: rebuilding the position in the checkpoint's epoch, taking over what a resumed run
had stored up to its checkpoint, and the interventions a fork inherits from its parent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import interventions as iv
from .checkpoint import restore_generators, restore_rng
from .errors import ConfigError, LrvizError
from .experiment import error_from_exception
from .records import Event, StepBuffer, ValPoint


@dataclass
class Origin:
    """Where a run continues from: ``fork`` (a new child run) or ``resume`` (the same run) of
    run ``run_id`` at the checkpoint file ``checkpoint`` taken before step ``step``."""

    kind: str
    run_id: int
    checkpoint: Path
    step: int


def rebuild_position(experiment: Any, train: Iterable[Any], checkpoint: Path, *, epoch: int, batches: int,
                     epoch_rng: dict[str, Any], epoch_data_rng: Any, rng: dict[str, Any], data_now: Any,
                     data_gens: dict[str, Any]) -> tuple[Any, int]:
    """The iterator of the checkpoint's epoch, ``batches`` batches in, with every RNG as it was then."""
    restore_rng(epoch_rng)
    restore_generators(data_gens, epoch_data_rng)
    during = f"iterating the training data (epoch {epoch + 1})"
    try:
        it = iter(train)
        for i in range(batches):
            try:
                next(it)
            except StopIteration:
                raise ConfigError(
                    f"checkpoint {checkpoint} continues at batch {batches} of epoch {epoch + 1}, but the "
                    f"training data now has {i} batches an epoch (did build_data change?)") from None
    except LrvizError:
        raise
    except Exception as exc:
        raise error_from_exception(exc, experiment.path, during) from exc
    restore_rng(rng)
    restore_generators(data_gens, data_now)
    return it, batches


def checkpoint_event_index(events: list[Event], origin: Origin) -> int | None:
    """The index of the event of ``origin``'s checkpoint in a stored run's events."""
    name = Path(origin.checkpoint).name
    for i, e in enumerate(events):
        if e.kind == "checkpoint" and e.step == origin.step and Path(str(e.data.get("path", ""))).name == name:
            return i
    return None


def take_over_stored_run(store: Any, origin: Origin, step: int,
                         groups: int) -> tuple[StepBuffer, list[Event], list[ValPoint], int]:
    """Resume: keep what the run recorded up to its checkpoint (that checkpoint's event too) and
    forget the rest. Returns the kept steps, events and validation, and the checkpoint event's index."""
    steps = store.load_steps(origin.run_id, 0, step)
    buffer = StepBuffer.from_columns(steps)
    if len(buffer) != step:
        raise ConfigError(f"run {origin.run_id} has {len(buffer)} stored steps, fewer than its checkpoint's "
                          f"step {step}; resume it from an earlier checkpoint (or fork it)")
    if len(buffer) and buffer.groups != groups:
        raise ConfigError("the stored run has another number of param groups than the script now builds")
    events = store.load_events(origin.run_id)
    at = checkpoint_event_index(events, origin)
    if at is None:  # no event names the file: keep what came before its step
        at = sum(1 for e in events if e.step < step) - 1
    kept = events[:at + 1]
    validation = [p for p in store.load_validation(origin.run_id) if p.step < step]
    with store.batch():
        store.truncate_run(origin.run_id, step)
        store.add_events(origin.run_id, [e for e in kept if e.step >= step])
    return buffer, kept, validation, at


def parent_interventions(store: Any, origin: Origin) -> list[iv.Intervention]:
    """The interventions the parent applied after the checkpoint a fork starts from."""
    events = store.load_events(origin.run_id)
    at = checkpoint_event_index(events, origin)
    later = events[at + 1:] if at is not None else [e for e in events if e.step > origin.step]
    return [x for x in iv.from_events(later) if x.step >= origin.step]
