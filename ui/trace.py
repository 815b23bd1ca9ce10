"""A run's series as the plots draw them: kept decimated and up to date, without Qt.

A :class:`RunTrace` wraps a :class:`~lrviz.records.StepBuffer` (a live run's, or one built from
the store) and the run's events and validation points. ``update()`` folds in only the rows added
since the last call (called from the redraw timer); ``query()`` returns what to draw for a step
range at a pixel width.

Memory: a trace keeps no copy of the history. Its min/max pyramids hold float32 block extremes
(factor 8: about 1.2 bytes a step per series); the smoothed loss is not stored but recomputed for
the rows a query needs, from the smoother's state saved every ``SMOOTH_BLOCK`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lrviz.decimate import EmaSmoother, PeakPyramid
from lrviz.export import plot_panels
from lrviz.records import Event, StepBuffer, ValPoint

#: The smoother's state is kept at every this many rows (the smoothed loss is recomputed from there).
SMOOTH_BLOCK = 4096
#: Pyramid settings: coarser levels (factor 8) of float32 extremes, growing by a quarter at a time.
PYRAMID = {"factor": 8, "dtype": np.float32, "growth": 1.25}


class RunTrace:
    """The step series of one run with min/max pyramids, a smoothed loss, events and validation.

    ``buffer`` is a StepBuffer or a callable returning one (None until the engine has prepared);
    ``events`` and ``validation`` are append-only lists (the engine's own, for a live run).
    """

    def __init__(
        self,
        buffer: StepBuffer | Callable[[], StepBuffer | None] | None,
        events: Sequence[Event] = (),
        validation: Sequence[ValPoint] = (),
        *,
        label: str = "",
        run_id: int | None = None,
        smoothing: float = 0.6,
        live: bool = False,
    ):
        self._get_buffer: Callable[[], StepBuffer | None] = (
            buffer if callable(buffer) else (lambda: buffer)  # type: ignore[assignment,return-value]
        )
        self.events = events
        self.validation = validation
        self.label = label
        self.run_id = run_id
        self.live = live
        self.rows = 0
        self.first_step = 0
        self.groups = 0
        self._smoothing = smoothing
        self._smoother = EmaSmoother(smoothing)
        self._smooth_states: list[tuple[float, int]] = []  # the smoother before rows 0, B, 2B, ...
        self._pyr: dict[str, PeakPyramid] = {}
        self._n_events = 0
        self._n_val = 0
        self._val_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def buffer(self) -> StepBuffer | None:
        return self._get_buffer()

    @property
    def smoothing(self) -> float:
        return self._smoothing

    # ---- folding in new rows ----------------------------------------------------------------
    def update(self) -> bool:
        """Fold in rows, events and validation points added since the last call; True when any."""
        changed = False
        buf = self._get_buffer()
        if buf is not None:
            n = len(buf)
            if n > self.rows:
                self._fold(buf, self.rows, n)
                changed = True
        if len(self.events) != self._n_events:
            self._n_events = len(self.events)
            changed = True
        if len(self.validation) != self._n_val:
            self._n_val = len(self.validation)
            self._val_cache = None
            changed = True
        return changed

    def _fold(self, buf: StepBuffer, start: int, stop: int) -> None:
        v = buf.view(start, stop)
        stop = start + len(v["loss"])
        if start == 0:
            self.first_step = buf.first_step
            self.groups = v["lr"].shape[1] if v["lr"].ndim == 2 else 1
        loss = v["loss"]
        smooth = self._smooth_rows(start, loss)
        lr = v["lr"].reshape(len(loss), -1)
        columns: dict[str, np.ndarray] = {"loss": loss, "loss_smooth": smooth}
        for panel in plot_panels():  # the panels of one per-step column (the gradient norm...)
            if panel.column is not None and panel.column in v:
                columns[panel.column] = v[panel.column]
        for g in range(self.groups):
            columns[f"lr{g}"] = lr[:, g]
        for name, values in columns.items():
            self._pyr.setdefault(name, PeakPyramid(**PYRAMID)).extend(values)
        self.rows = stop

    def _smooth_rows(self, start: int, loss: np.ndarray) -> np.ndarray:
        """The smoothed values of new rows ``start..``, noting the smoother's state at block starts."""
        sm = self._smoother
        out = np.empty(len(loss))
        done = 0
        while done < len(loss):
            row = start + done
            if row % SMOOTH_BLOCK == 0 and row // SMOOTH_BLOCK == len(self._smooth_states):
                self._smooth_states.append((sm._last, sm._count))
            take = min(len(loss) - done, SMOOTH_BLOCK - row % SMOOTH_BLOCK)
            out[done:done + take] = sm.extend(loss[done:done + take])
            done += take
        return out

    def _smoothed(self, a: int, b: int) -> np.ndarray:
        """The smoothed loss of rows ``a:b`` (recomputed from the state at the block holding ``a``)."""
        buf = self._get_buffer()
        k = min(a // SMOOTH_BLOCK, len(self._smooth_states) - 1)
        if buf is None or k < 0 or b <= a:
            return np.empty(0)
        base = k * SMOOTH_BLOCK
        sm = EmaSmoother(self._smoothing)
        sm._last, sm._count = self._smooth_states[k]
        return sm.extend(buf.view(base, b)["loss"])[a - base:]

    def set_smoothing(self, weight: float) -> None:
        """Recompute the smoothed loss with another weight (whole history: O(n), vectorised)."""
        if weight == self._smoothing:
            return
        self._smoothing = weight
        self._smoother = EmaSmoother(weight)
        self._smooth_states = []
        pyr = PeakPyramid(**PYRAMID)
        buf = self._get_buffer()
        for a in range(0, self.rows if buf is not None else 0, SMOOTH_BLOCK):
            b = min(self.rows, a + SMOOTH_BLOCK)
            pyr.extend(self._smooth_rows(a, buf.view(a, b)["loss"]))
        self._pyr["loss_smooth"] = pyr

    @property
    def nbytes(self) -> int:
        """Memory the trace itself keeps (its pyramids), besides the buffer it reads."""
        return sum(p.nbytes for p in self._pyr.values()) + 16 * len(self._smooth_states)

    # ---- reading ------------------------------------------------------------------------------
    @property
    def last_step(self) -> int:
        """The last recorded step, or ``first_step - 1`` when there is none."""
        return self.first_step + self.rows - 1

    def _raw(self, name: str) -> Callable[[int, int], np.ndarray]:
        if name == "loss_smooth":
            return self._smoothed

        def read(a: int, b: int) -> np.ndarray:
            buf = self._get_buffer()
            assert buf is not None
            v = buf.view(a, b)
            if name.startswith("lr"):
                return v["lr"].reshape(b - a, -1)[:, int(name[2:])]
            return v[name]

        return read

    def query(self, name: str, x0: float, x1: float, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values to draw series ``name`` over steps ``x0..x1`` on ``width`` pixels."""
        pyr = self._pyr.get(name)
        if pyr is None or not self.rows:
            return np.empty(0), np.empty(0)
        i0 = int(math.floor(x0)) - self.first_step
        i1 = int(math.ceil(x1)) + 1 - self.first_step
        x, y = pyr.query(i0, min(i1, self.rows), width, self._raw(name))
        if self.first_step:
            x += self.first_step
        return x, y

    def value_at(self, step: int) -> dict[str, Any] | None:
        """The recorded values at ``step`` (loss, smoothed loss, grad norm, epoch, lrs), or None."""
        row = int(step) - self.first_step
        buf = self._get_buffer()
        if buf is None or not 0 <= row < self.rows:
            return None
        v = buf.view(row, row + 1)
        return {
            "step": int(step),
            "epoch": int(v["epoch"][0]),
            "loss": float(v["loss"][0]),
            "loss_smooth": float(self._smoothed(row, row + 1)[0]) if row < self.rows else math.nan,
            "grad_norm": float(v["grad_norm"][0]),
            "lr": [float(x) for x in np.asarray(v["lr"]).reshape(-1)],
        }

    def validation_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps, losses and accuracies (NaN where not recorded) of the validation points so far."""
        if self._val_cache is None or len(self._val_cache[0]) != len(self.validation):
            pts = list(self.validation[: len(self.validation)])
            steps = np.array([p.step for p in pts], np.float64)
            loss = np.array([p.loss for p in pts], np.float64)
            acc = np.array([math.nan if p.accuracy is None else p.accuracy for p in pts], np.float64)
            self._val_cache = (steps, loss, acc)
        return self._val_cache

    def validation_near(self, step: int) -> ValPoint | None:
        """The last validation point at or before ``step``."""
        steps = self.validation_arrays()[0]
        i = int(np.searchsorted(steps, step, side="right")) - 1
        return self.validation[i] if i >= 0 else None

    def has_accuracy(self) -> bool:
        """Whether any validation point recorded an accuracy."""
        return bool(np.isfinite(self.validation_arrays()[2]).any())
