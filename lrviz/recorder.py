"""What a run records, for any training loop: step columns, events, validation points, lab data,
and the run's row in the store (written in batches by a :class:`~lrviz.store.writer.StoreWriter`).

The built-in engine and ``lrviz.track`` each own one recorder; the live endpoint and the app read
it. Every list here is append-only and only its loop appends (readers in other threads take a
length, then a slice).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .records import Event, StepBuffer, ValPoint
from .states import RunState

log = logging.getLogger(__name__)


def recorded(name: str) -> property:
    """An attribute of a loop (engine, tracked run) that is its recorder's ``rec.<name>``."""
    return property(lambda self: getattr(self.rec, name), lambda self, v: setattr(self.rec, name, v),
                    doc=f"The recorder's ``{name}``.")


class Recorded:
    """The attributes a live endpoint reads of a loop (an engine, a tracked run), kept in its recorder
    ``self.rec``: one list for both."""

    state = recorded("state")
    run_id = recorded("run_id")
    buffer = recorded("buffer")
    events = recorded("events")
    validation = recorded("validation")
    probe_steps = recorded("probe_steps")
    probe_values = recorded("probe_values")
    range_test_progress = recorded("range_test_progress")


class RunRecorder:
    """The records of one run, and its store row once :meth:`open` made one."""

    def __init__(self, store: Any = None):
        self.store = store
        self.run_id: int | None = None
        self.state: str = RunState.IDLE
        self.buffer: StepBuffer | None = None
        self.events: list[Event] = []
        self.validation: list[ValPoint] = []
        #: Lab data a watcher may draw: a probe's values per step, a range test's (lr, loss) points.
        self.probe_steps: list[int] = []
        self.probe_values: dict[str, list[float]] = {}
        self.range_test_progress: list[tuple[float, float]] = []
        #: Other scalars logged by name (``lrviz.track``'s ``run.log``): name -> (steps, values, times).
        self.scalars: dict[str, tuple[list[int], list[float], list[float]]] = {}
        #: Called with the run's id once it is recorded in the store (e.g. to register its endpoint).
        self.on_open: list[Callable[[int], None]] = []
        self.writer: Any = None
        #: Rows, events and validation points already in the store (a resumed run).
        self.writer_start = (0, 0, 0)
        self.t0 = time.perf_counter()

    def clock(self) -> float:
        """Seconds since the run's time origin (continuing a checkpoint's time)."""
        return time.perf_counter() - self.t0

    def event(self, kind: str, data: dict[str, Any], step: int) -> Event:
        e = Event(step, str(kind), data, self.clock())
        self.events.append(e)
        return e

    def open(self, *, run_id: int | None = None, **row: Any) -> int | None:
        """Create the run's store row (or take over ``run_id``), mark it running, start saving.

        ``row``: ``script_path``, ``script_hash``, ``config``, ``device``, ``name``, ``parent_id``,
        ``fork_step``, ``kind`` as :meth:`lrviz.store.runs.RunStore.create_run` takes them. No store: nothing.
        """
        if self.store is None:
            return None
        from .store.writer import StoreWriter

        self.run_id = run_id if run_id is not None else self.store.create_run(**row)
        self.store.set_status(self.run_id, "running")
        self.writer = StoreWriter(self.store, self.run_id, self, start=self.writer_start)
        self.writer.start()
        for callback in self.on_open:
            callback(self.run_id)
        return self.run_id

    def close(self, summary: dict[str, Any], error: str | None) -> None:
        """Save the rest and the final state (never raises: the end of a run is not a crash)."""
        if self.writer is None:
            return
        try:
            self.writer.close(str(self.state), summary, error)
        except Exception:
            log.exception("could not save the end of the run")

    def summary(self, step: int, has_validation: bool | None = None) -> dict[str, Any]:
        """Figures of the run so far: steps, best/final loss, best/final validation loss, speed, and the
        generalization verdict with its gap figures (``has_validation``: whether the script has
        validation data, when known; it words the verdict of a run without validation points)."""
        out: dict[str, Any] = {"steps": step, "state": str(self.state)}
        buf = self.buffer
        if buf is not None and len(buf):
            v = buf.view()
            loss = v["loss"]
            finite = loss[np.isfinite(loss)]
            out["final_loss"] = float(loss[-1])
            out["best_loss"] = float(finite.min()) if finite.size else None
            dt = float(v["time"][-1])
            out["seconds"] = dt
            out["steps_per_s"] = len(loss) / dt if dt > 0 else None
        if self.validation:
            vals = [p.loss for p in self.validation if math.isfinite(p.loss)]
            out["final_val_loss"] = self.validation[-1].loss
            out["best_val_loss"] = min(vals) if vals else None
            if self.validation[-1].accuracy is not None:
                out["final_val_accuracy"] = self.validation[-1].accuracy
        if buf is not None and len(buf):
            from .lab.diagnostics import run_generalization

            v = buf.view()
            out["generalization"] = run_generalization(v["step"], v["loss"], list(self.validation), has_validation)
        return out

    def add_scalar(self, name: str, step: int, value: float) -> None:
        """Log ``value`` of the series ``name`` at ``step`` (saved with the run's extra scalars)."""
        steps, values, times = self.scalars.setdefault(str(name), ([], [], []))
        times.append(self.clock())
        values.append(float(value))
        steps.append(int(step))  # last: a reader takes len(steps) and finds the other two filled

    def record_probe(self, step: int, values: list[tuple[str, float]]) -> None:
        self.probe_steps.append(step)
        for k, v in values:
            self.probe_values.setdefault(k, []).append(v)
