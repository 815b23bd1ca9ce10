"""Per-step records: preallocated, append-only NumPy columns shared by one writer and any readers.

The engine appends; the UI timer, the store writer and exports read. No lock: the writer fills a
row, then publishes it by bumping ``n``; a reader takes ``n`` and the current arrays and slices
views (no copy). Growth doubles the capacity into new arrays; readers holding the old ones keep
valid data up to the old capacity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

STEP_COLUMNS = ("epoch", "time", "loss", "grad_norm", "lr")


class _Columns:
    __slots__ = ("capacity", "epoch", "time", "loss", "grad_norm", "lr")

    def __init__(self, capacity: int, groups: int):
        self.capacity = capacity
        self.epoch = np.zeros(capacity, np.int32)
        self.time = np.zeros(capacity, np.float64)
        self.loss = np.zeros(capacity, np.float64)
        self.grad_norm = np.zeros(capacity, np.float32)
        self.lr = np.zeros((capacity, groups), np.float64)

    def grown(self, capacity: int, n: int) -> _Columns:
        new = _Columns(capacity, self.lr.shape[1])
        for name in STEP_COLUMNS:
            getattr(new, name)[:n] = getattr(self, name)[:n]
        return new


class StepBuffer:
    """The whole per-step history of a run: step ``first_step + i`` is row ``i``."""

    def __init__(self, groups: int = 1, capacity: int = 4096, first_step: int = 0):
        self.groups = groups
        self.first_step = first_step
        self._cols = _Columns(max(16, capacity), groups)
        self._steps: np.ndarray | None = None
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def reserve(self) -> _Columns:
        """The arrays the writer fills next; grows them when row ``n`` would not fit (writer only)."""
        cols = self._cols
        if self.n >= cols.capacity:
            cols = cols.grown(cols.capacity * 2, self.n)
            self._cols = cols
        return cols

    def reserve_row(self, row: int) -> _Columns:
        """The arrays, grown so that row ``row`` fits (writer only; the row is published later).

        Rows from ``n`` up to ``row`` may be staged (filled, not yet published): a growth keeps them.
        """
        cols = self._cols
        if row >= cols.capacity:
            cap = cols.capacity
            while row >= cap:
                cap *= 2
            cols = cols.grown(cap, min(max(row, self.n), cols.capacity))
            self._cols = cols
        return cols

    def append(self, epoch: int, time: float, loss: float, grad_norm: float, lrs: Any) -> None:
        """Add one step (writer only)."""
        cols = self.reserve()
        i = self.n
        cols.epoch[i] = epoch
        cols.time[i] = time
        cols.loss[i] = loss
        cols.grad_norm[i] = grad_norm
        cols.lr[i] = lrs
        self.n = i + 1

    def extend(self, columns: dict[str, np.ndarray]) -> None:
        """Add a block of rows at once (writer only), e.g. a chunk received from a live run."""
        k = len(columns["loss"])
        if not k:
            return
        cols = self.reserve_row(self.n + k - 1)
        i = self.n
        for name in STEP_COLUMNS:
            dest = getattr(cols, name)
            dest[i:i + k] = np.asarray(columns[name]).reshape(dest[i:i + k].shape)
        self.n = i + k

    def view(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Read-only views of rows ``start:stop`` (row indices) as they are published now, plus ``step``."""
        cols = self._cols
        n = min(self.n, cols.capacity)
        stop = n if stop is None else min(stop, n)
        start = min(max(0, start), stop)
        out = {name: getattr(cols, name)[start:stop] for name in STEP_COLUMNS}
        out["step"] = self._step_numbers(stop)[start:stop]
        for a in out.values():
            a.flags.writeable = False
        return out

    def _step_numbers(self, n: int) -> np.ndarray:
        """Step numbers of rows 0..n-1, from a cache that grows by doubling (no array per read)."""
        cache = self._steps
        if cache is None or len(cache) < n:
            size = max(n, 2 * (0 if cache is None else len(cache)), 16)
            cache = np.arange(self.first_step, self.first_step + size, dtype=np.int64)
            cache.flags.writeable = False
            self._steps = cache
        return cache

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray], first_step: int = 0) -> StepBuffer:
        """A buffer holding stored columns (for viewing a finished run with the same code)."""
        n = len(columns.get("loss", ()))
        lr = columns.get("lr")
        groups = lr.shape[1] if lr is not None and lr.ndim == 2 and lr.shape[1] else 1
        buf = cls(groups=groups, capacity=max(16, n), first_step=first_step)
        for name in STEP_COLUMNS:
            if name in columns and n:
                getattr(buf._cols, name)[:n] = np.asarray(columns[name]).reshape(getattr(buf._cols, name)[:n].shape)
        buf.n = n
        return buf


@dataclass
class Event:
    """Something that happened at a step: an intervention, a pause, an error, a checkpoint..."""

    step: int
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0


@dataclass
class ValPoint:
    """A validation pass after ``step``: mean loss, and accuracy for class logits."""

    step: int
    epoch: int
    loss: float
    accuracy: float | None = None
    time: float = 0.0
