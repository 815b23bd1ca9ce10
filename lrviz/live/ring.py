"""A shared-memory ring of step rows: a local client reads a run's rows without the run's GIL.

The training thread copies each block of rows it publishes (:meth:`StepBuffer.publish`, 64 rows at a
time on the CPU) into a file of fixed size in ``/dev/shm`` (else the endpoint's private folder),
mode 0600, named unguessably; a client on the same machine maps it and reads the rows itself. The
endpoint's thread never touches them, so a watched run pays only the copy (a few slice assignments
per block) instead of a thread that wakes 30 times a second to take the GIL, pack and send.

Layout (in the machine's own byte order: the ring never leaves it): a 64-byte header, then the columns of :data:`lrviz.records.STEP_COLUMNS`
as arrays of ``capacity`` rows each (``lr`` as ``capacity x groups``). Row ``r`` of the run (row
``r`` of its StepBuffer, step ``first_step + r``) lives in slot ``r % capacity``.

    magic[8] version:u32 groups:u32 first_step:i64 capacity:u64 start:u64 claim:u64 count:u64 pad[8]

``start`` is the first row the ring holds (:data:`UNSET` until the first block); ``count`` the rows
published (absolute: rows ``[start, count)`` were written, the last ``capacity`` of them are there);
``claim`` the rows being written now. The writer sets ``claim``, fences, writes the rows, fences and
sets ``count``; a reader takes ``count``, fences, copies, fences and reads ``claim``: rows below
``claim - capacity`` may have been overwritten while it copied (it was lapped) and must be fetched
another way. A fence is a lock's acquire and release (a full barrier on x86 and ARM).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from lrviz.records import CHUNK_ROWS, STEP_COLUMNS

MAGIC = b"LRVZRNG1"
VERSION = 1
HEADER_BYTES = 64
#: Rows the ring holds: ~10 s of a 3,000-steps-a-second run (a client reads it ~30 times a second).
CAPACITY = 1 << 15
UNSET = (1 << 64) - 1
_CAPACITY, _START, _CLAIM, _COUNT = 3, 4, 5, 6  # uint64 slots of the header
_DTYPES = {"epoch": np.dtype("=i4"), "time": np.dtype("=f8"), "loss": np.dtype("=f8"),
           "grad_norm": np.dtype("=f4"), "lr": np.dtype("=f8")}
_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier (a lock's acquire and release)."""
    _fence_lock.acquire()
    _fence_lock.release()


def ring_folder(fallback: Path | None) -> Path:
    """Where rings live: ``/dev/shm`` (memory) when there is one, else ``fallback`` (a private folder)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    if fallback is None:
        import tempfile

        return Path(tempfile.gettempdir())
    return fallback


def ring_path(fallback: Path | None) -> Path:
    """A fresh, unguessable ring file path (the name carries the pid and 128 random bits)."""
    return ring_folder(fallback) / f"lrviz-ring-{os.getpid()}-{os.urandom(16).hex()}"


def _layout(capacity: int, groups: int) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
    off = HEADER_BYTES
    for name in STEP_COLUMNS:
        shape = (capacity, groups) if name == "lr" else (capacity,)
        offsets[name] = (off, shape)
        off += int(np.prod(shape)) * _DTYPES[name].itemsize
        off = (off + 7) // 8 * 8
    return offsets, off


class _Mapped:
    """The header and column arrays over a mapped ring file."""

    def __init__(self, mm: mmap.mmap, capacity: int, groups: int):
        self.mm = mm
        self.capacity = capacity
        self.groups = groups
        self.header = np.frombuffer(mm, dtype="=u8", count=HEADER_BYTES // 8)
        offsets, _ = _layout(capacity, groups)
        self.cols = {name: np.frombuffer(mm, dtype=_DTYPES[name], count=int(np.prod(shape)), offset=off).reshape(shape)
                     for name, (off, shape) in offsets.items()}

    def release(self) -> None:
        self.header = None  # type: ignore[assignment]
        self.cols = {}
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view: the mapping goes when it does
            pass


class RingWriter:
    """The training process's side: a StepBuffer's ``mirror`` (its :meth:`write` runs in the thread
    that publishes rows). ``close()`` unmaps and unlinks the file.

    The copy is a few byte-slice assignments per block (a memcpy each, no NumPy call: the training
    thread comes to it with cold caches every 64 steps, where NumPy's assignment machinery costs
    several microseconds a call).
    """

    def __init__(self, path: Path, groups: int, first_step: int, capacity: int = CAPACITY):
        self.path = Path(path)
        self.capacity = capacity
        self.groups = groups
        self.first_step = first_step
        offsets, size = _layout(capacity, groups)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        except OSError:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self._mm: mmap.mmap | None = mm
        mm[:8] = MAGIC
        mm[8:16] = np.array([VERSION, groups], "=u4").tobytes()
        mm[16:24] = np.array([first_step], "=i8").tobytes()
        self._mv = memoryview(mm)
        self._hdr = self._mv[:HEADER_BYTES].cast("Q")  # an aligned 8-byte store per slot
        self._hdr[_CAPACITY], self._hdr[_START], self._hdr[_CLAIM], self._hdr[_COUNT] = capacity, UNSET, 0, 0
        self._dst = [(off, int(np.prod(shape[1:], dtype=np.int64)) * _DTYPES[name].itemsize)
                     for name, (off, shape) in offsets.items()]  # (byte offset, bytes a row) per column
        self._src_chunk: Any = None
        self._src: list[memoryview] = []
        self.start: int | None = None
        self.count = 0
        #: What the copies cost the training thread (seconds), over how many calls and rows.
        self.write_s = 0.0
        self.writes = 0
        self.rows = 0
        #: A list to get each copy's seconds (a benchmark sets it; the mean above counts the times the
        #: thread was preempted mid-copy on a busy machine, the median does not).
        self.timings: list[float] | None = None
        self._lock = threading.Lock()  # write() against close()

    def _source(self, buf: Any, k: int) -> list[memoryview]:
        """Chunk ``k``'s columns as bytes (kept while the writer is in that chunk)."""
        c = buf._chunks[k]
        if c is not self._src_chunk:
            cols = buf._columns_of(k) if hasattr(c, "decode") else {n: getattr(c, n) for n in STEP_COLUMNS}
            arrays = [np.ascontiguousarray(cols[n], dtype=_DTYPES[n]) for n in STEP_COLUMNS]
            self._src = [memoryview(a).cast("B") for a in arrays]
            self._src_chunk = c
        return self._src

    def write(self, buf: Any, lo: int, hi: int) -> None:
        """Copy rows ``[lo, hi)`` of ``buf`` (written, about to be published) into the ring."""
        t0 = time.perf_counter()
        with self._lock:
            if self._mm is None or hi <= lo:
                return
            hdr, mv = self._hdr, self._mv
            if self.start is None:
                self.start = lo
                hdr[_START] = lo
            cap = self.capacity
            if hi - lo > cap:
                lo = hi - cap
            hdr[_CLAIM] = hi
            fence()
            row = lo
            while row < hi:
                k, a = divmod(row, CHUNK_ROWS)
                s = row % cap
                take = min(hi - row, CHUNK_ROWS - a, cap - s)  # within one chunk, not across the wrap
                for (off, rb), src in zip(self._dst, self._source(buf, k)):
                    mv[off + s * rb:off + (s + take) * rb] = src[a * rb:(a + take) * rb]
                row += take
            fence()
            hdr[_COUNT] = hi
            self.count = hi
        dt = time.perf_counter() - t0
        self.write_s += dt
        if self.timings is not None:
            self.timings.append(dt)
        self.writes += 1
        self.rows += hi - lo

    def close(self) -> None:
        """Unmap and remove the file (clients that mapped it keep their mapping)."""
        with self._lock:
            mm, self._mm = self._mm, None
            if mm is not None:
                self._src, self._src_chunk = [], None
                self._hdr.release()
                self._mv.release()
                mm.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class RingError(Exception):
    """The file is not a ring this reader understands."""


class RingReader:
    """A client's side: maps a ring read-only and copies rows out of it."""

    def __init__(self, path: str | os.PathLike):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise RingError(f"{path}: too short for a ring")
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if mm[:8] != MAGIC:
            mm.close()
            raise RingError(f"{path}: not an lrviz ring")
        version, groups = np.frombuffer(mm, dtype="=u4", count=2, offset=8).tolist()
        capacity = int(np.frombuffer(mm, dtype="=u8", count=1, offset=8 * _CAPACITY)[0])
        if version != VERSION or not groups or not capacity or _layout(capacity, groups)[1] > size:
            mm.close()
            raise RingError(f"{path}: a ring of another version or a damaged one")
        self._m = _Mapped(mm, capacity, groups)
        self.capacity = capacity
        self.groups = groups
        self.first_step = int(np.frombuffer(mm, dtype="=i8", count=1, offset=16)[0])

    @property
    def start(self) -> int | None:
        s = int(self._m.header[_START])
        return None if s == UNSET else s

    @property
    def count(self) -> int:
        return int(self._m.header[_COUNT])

    def read(self, lo: int) -> tuple[dict[str, np.ndarray] | None, int]:
        """Rows ``[lo, count)`` as fresh arrays, and ``count``. None (and ``count``) when some of them
        were overwritten before or while they were copied (the reader was lapped): fetch them another way.
        """
        fence()
        hi = int(self._m.header[_COUNT])
        fence()
        start = self.start
        if hi <= lo:
            return {}, hi
        if start is None or lo < start:
            return None, hi
        cap = self.capacity
        if hi - lo > cap:
            return None, hi
        cols = self._m.cols
        out: dict[str, np.ndarray] = {}
        a, b = lo % cap, (hi - 1) % cap + 1
        for name in STEP_COLUMNS:
            col = cols[name]
            out[name] = col[a:b].copy() if a < b else np.concatenate([col[a:], col[:b]])
        fence()
        claim = int(self._m.header[_CLAIM])
        if lo < claim - cap:  # the writer reached our first rows while we copied
            return None, hi
        return out, hi

    def close(self) -> None:
        self._m.release()
