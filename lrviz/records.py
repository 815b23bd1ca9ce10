"""Per-step records: append-only NumPy columns shared by one writer and any readers, kept compact.

The engine appends; the UI timer, the store writer, the live endpoint and exports read. No lock:
the writer fills rows, then publishes them by bumping ``n``; a reader takes ``n`` and reads up to it.

Rows live in chunks of :data:`CHUNK_ROWS`. A full chunk that is published can be *sealed*: its
columns compressed with the store's codec (byte-shuffled, delta-coded where that is smaller; about
13 bytes a step instead of 32), decoded again when a reader asks for those rows (the last few are
cached). ``seal()`` runs off the training thread (the store writer's, a live client's reader);
a reader holding a raw chunk it took before keeps valid arrays. A view within one raw chunk is a
zero-copy view; one that spans chunks is a copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STEP_COLUMNS = ("epoch", "time", "loss", "grad_norm", "lr")
#: Rows per chunk: the unit of sealing (compression) and of decoding a sealed range again.
CHUNK_ROWS = 4096
#: Decoded sealed chunks kept for readers that come back to the same range (e.g. a zoomed plot).
CACHED_CHUNKS = 4


class _Columns:
    """One chunk's raw columns (``CHUNK_ROWS`` rows)."""

    __slots__ = ("epoch", "time", "loss", "grad_norm", "lr")

    def __init__(self, rows: int, groups: int):
        self.epoch = np.zeros(rows, np.int32)
        self.time = np.zeros(rows, np.float64)
        self.loss = np.zeros(rows, np.float64)
        self.grad_norm = np.zeros(rows, np.float32)
        self.lr = np.zeros((rows, groups), np.float64)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in STEP_COLUMNS}


class _Sealed:
    """A full chunk, compressed (the store's chunk format: a JSON header and the encoded columns)."""

    __slots__ = ("header", "data")

    def __init__(self, cols: _Columns):
        from .store.codec import pack

        self.header, self.data = pack(CHUNK_ROWS, cols.as_dict())

    def decode(self) -> dict[str, np.ndarray]:
        from .store.codec import unpack

        return unpack(self.header, self.data, "a sealed chunk of the step buffer")

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.header)


class StepBuffer:
    """The whole per-step history of a run: step ``first_step + i`` is row ``i``.

    Writer API (one thread): :meth:`append` one row, or :meth:`write` a block of columns and
    :meth:`publish` it; rows past ``n`` may be written ahead (staged) and published later.
    Readers: :meth:`view`, ``len()``. :meth:`seal` compresses full chunks (any thread, one at a time).
    """

    def __init__(self, groups: int = 1, capacity: int = CHUNK_ROWS, first_step: int = 0):
        self.groups = groups
        self.first_step = first_step
        self._chunks: list[_Columns | _Sealed] = []
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._seal_lock = threading.Lock()
        self._sealed_upto = 0  # chunks before this index are sealed
        self.n = 0
        #: Gets every block of rows as it is published, before readers of ``n`` see it, in the
        #: writer's thread: ``mirror.write(buffer, lo, hi)`` (a live endpoint's shared-memory ring).
        self.mirror: Any = None

    def __len__(self) -> int:
        return self.n

    # ---- writing (one thread) ---------------------------------------------------------------------
    def _chunk(self, k: int) -> _Columns:
        """Raw chunk ``k`` for writing (created when the writer first reaches it)."""
        chunks = self._chunks
        while len(chunks) <= k:
            chunks.append(_Columns(CHUNK_ROWS, self.groups))
        c = chunks[k]
        assert isinstance(c, _Columns), "rows of a sealed chunk are never written again"
        return c

    def append(self, epoch: int, time: float, loss: float, grad_norm: float, lrs: Any) -> None:
        """Add one step (writer only)."""
        i = self.n
        k, r = divmod(i, CHUNK_ROWS)
        c = self._chunks[k] if k < len(self._chunks) else self._chunk(k)
        c.epoch[r] = epoch
        c.time[r] = time
        c.loss[r] = loss
        c.grad_norm[r] = grad_norm
        c.lr[r] = lrs
        if self.mirror is not None:
            self.mirror.write(self, i, i + 1)
        self.n = i + 1

    def write(self, start: int, **columns: Any) -> None:
        """Write rows ``start..`` of the given columns (any subset; sequences, arrays or anything with
        the buffer protocol, e.g. ``array.array``), not publishing them."""
        for name, values in columns.items():
            a = np.asarray(values)
            if name == "lr":
                a = a.reshape(-1, self.groups)
            k = len(a)
            done = 0
            while done < k:
                ci, r = divmod(start + done, CHUNK_ROWS)
                take = min(k - done, CHUNK_ROWS - r)
                getattr(self._chunk(ci), name)[r:r + take] = a[done:done + take]
                done += take

    def publish(self, n: int) -> None:
        """Rows below ``n`` are complete: readers may see them."""
        m = self.mirror
        if m is not None and n > self.n:
            m.write(self, self.n, n)
        self.n = n

    def extend(self, columns: Mapping[str, np.ndarray]) -> None:
        """Add a block of rows at once (writer only), e.g. a chunk received from a live run."""
        k = len(columns["loss"])
        if not k:
            return
        self.write(self.n, **{name: columns[name] for name in STEP_COLUMNS})
        self.publish(self.n + k)

    # ---- sealing ----------------------------------------------------------------------------------
    def seal(self, keep: int = 1) -> int:
        """Compress the full, published chunks but the newest ``keep`` of them; the number sealed."""
        with self._seal_lock:
            full = self.n // CHUNK_ROWS - keep
            done = 0
            for k in range(self._sealed_upto, max(self._sealed_upto, full)):
                c = self._chunks[k]
                if isinstance(c, _Columns):
                    self._chunks[k] = _Sealed(c)
                    done += 1
                self._sealed_upto = k + 1
            return done

    @property
    def nbytes(self) -> int:
        """Memory the columns take (raw chunks in full, sealed ones compressed)."""
        total = 0
        for c in list(self._chunks):
            total += c.nbytes if isinstance(c, _Sealed) else sum(a.nbytes for a in c.as_dict().values())
        return total

    # ---- reading ----------------------------------------------------------------------------------
    def _columns_of(self, k: int) -> dict[str, np.ndarray]:
        c = self._chunks[k]
        if isinstance(c, _Columns):
            return c.as_dict()
        with self._cache_lock:
            hit = self._cache.get(k)
            if hit is not None:
                self._cache.move_to_end(k)
                return hit
        cols = c.decode()
        with self._cache_lock:
            self._cache[k] = cols
            while len(self._cache) > CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return cols

    def view(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Read-only arrays of rows ``start:stop`` (row indices) as published now, plus ``step``.

        Within one raw chunk these are views (no copy); across chunks, or from sealed ones, copies.
        """
        n = self.n
        stop = n if stop is None else min(stop, n)
        start = min(max(0, start), stop)
        if start == stop:
            out = {name: _empty(name, self.groups) for name in STEP_COLUMNS}
        else:
            k0, k1 = start // CHUNK_ROWS, (stop - 1) // CHUNK_ROWS
            parts = []
            for k in range(k0, k1 + 1):
                base = k * CHUNK_ROWS
                a, b = max(start, base) - base, min(stop, base + CHUNK_ROWS) - base
                cols = self._columns_of(k)
                parts.append({name: cols[name][a:b] for name in STEP_COLUMNS})
            if len(parts) == 1:
                out = parts[0]
            else:
                out = {name: np.concatenate([p[name] for p in parts]) for name in STEP_COLUMNS}
        out["step"] = np.arange(self.first_step + start, self.first_step + stop, dtype=np.int64)
        for a in out.values():
            a.flags.writeable = False
        return out

    @classmethod
    def from_columns(cls, columns: Mapping[str, np.ndarray], first_step: int = 0) -> StepBuffer:
        """A buffer holding stored columns (for viewing a finished run with the same code)."""
        n = len(columns.get("loss", ()))
        lr = columns.get("lr")
        groups = lr.shape[1] if lr is not None and lr.ndim == 2 and lr.shape[1] else 1
        buf = cls(groups=groups, first_step=first_step)
        if n:
            filled = {name: np.asarray(columns[name]) for name in STEP_COLUMNS if name in columns}
            buf.write(0, **filled)
            buf._chunk((n - 1) // CHUNK_ROWS)
        buf.n = n
        return buf


def _empty(name: str, groups: int) -> np.ndarray:
    if name == "lr":
        return np.zeros((0, groups), np.float64)
    return np.zeros(0, {"epoch": np.int32, "grad_norm": np.float32}.get(name, np.float64))


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
