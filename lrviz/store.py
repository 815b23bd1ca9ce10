"""The run store: an embedded SQLite database of training runs, their per-step series,
validation points and events.

One file (``runs.sqlite``, WAL journal) shared by the threads of one process and by several
processes (the app and the CLI). Checkpoints of run ``N`` live beside it in ``checkpoints/N/``.

Per-step series are stored as *chunks*: one row per ``append_steps`` call, each column a
zlib-compressed blob (bytes transposed by significance, optionally delta-coded first) described by
a small JSON header, so reads give back exactly the stored dtype, shape and bits.

JSON fields (run ``config`` and ``summary``, event ``data``) accept numpy scalars and arrays, tuples,
paths and tensors; non-finite floats are stored as the strings ``"nan"``, ``"inf"`` and ``"-inf"``
(``float()`` reads them back); other objects are stored as ``str(obj)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrviz.errors import StoreError
from lrviz.records import Event, ValPoint

__all__ = [
    "RUN_STATUSES",
    "TERMINAL_STATUSES",
    "Event",
    "RunInfo",
    "RunStore",
    "ValPoint",
]

log = logging.getLogger(__name__)

RUN_STATUSES = ("created", "running", "paused", "finished", "stopped", "diverged", "failed", "interrupted")
#: Statuses after which a run does not continue; setting one records ``ended_at``.
TERMINAL_STATUSES = frozenset({"finished", "stopped", "diverged", "failed", "interrupted"})
#: A 'running' or 'paused' run whose last heartbeat is older than this is taken as dead on open.
STALE_AFTER_S = 60.0
#: How long a connection waits for another writer's lock before giving up.
BUSY_TIMEOUT_S = 15.0
SCHEMA_VERSION = 1
DB_NAME = "runs.sqlite"
LOSS_COLUMN = "loss"
_DB_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_ZLEVEL = 6

#: Columns (dtype, shape after the step axis) returned empty for a run without steps.
EMPTY_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "step": ("<i8", ()),
    "epoch": ("<i4", ()),
    "time": ("<f8", ()),
    "loss": ("<f8", ()),
    "grad_norm": ("<f4", ()),
    "lr": ("<f8", (1,)),
}

_SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    script_path TEXT NOT NULL,
    script_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    device TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    heartbeat_at REAL,
    steps INTEGER NOT NULL DEFAULT 0,
    best_loss REAL,
    final_loss REAL,
    summary TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    parent_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
    fork_step INTEGER,
    pid INTEGER
);
CREATE INDEX runs_name ON runs(name);
CREATE TABLE chunks (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    start_step INTEGER NOT NULL,
    n INTEGER NOT NULL,
    loss_min REAL,
    loss_last REAL,
    header TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX chunks_run_start ON chunks(run_id, start_step);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX events_run ON events(run_id, step);
CREATE TABLE validation (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    loss REAL,
    accuracy REAL,
    time REAL NOT NULL
);
CREATE INDEX validation_run ON validation(run_id, step);
"""

_RUN_FIELDS = (
    "id, name, script_path, script_hash, config, device, status, created_at, started_at, ended_at, "
    "steps, best_loss, final_loss, summary, error, parent_id, fork_step, pid, heartbeat_at"
)


@dataclass
class RunInfo:
    """One training run as listed in the store (without its per-step series)."""

    id: int
    name: str
    script_path: str
    script_hash: str
    config: dict
    device: str
    status: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    steps: int
    """Number of stored steps."""
    best_loss: float | None
    """Lowest finite training loss stored (NaN/inf ignored)."""
    final_loss: float | None
    """Last finite training loss stored (NaN/inf ignored)."""
    summary: dict
    error: str | None
    parent_id: int | None
    fork_step: int | None
    pid: int | None
    heartbeat_at: float | None = None
    """Wall-clock time of the run's last heartbeat (or status change), if any."""


# --------------------------------------------------------------------------- JSON


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (see the module docstring for the conversions)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays, torch tensors
    if callable(tolist):
        try:
            return _jsonable(tolist())
        except Exception:  # noqa: BLE001 - fall back to the text form below
            pass
    return str(obj)


def _dumps(obj: Any) -> str:
    return json.dumps(_jsonable(obj), allow_nan=False, separators=(",", ":"))


def _loads(text: str | None, what: str = "a JSON field") -> Any:
    """Decode a stored JSON field; damaged text is a StoreError (kind 'damaged') naming ``what``."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{what} is damaged ({exc}); the rest of the store is readable", kind="damaged") from None


# --------------------------------------------------------------------------- column codec

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _shuffle(raw: np.ndarray, itemsize: int) -> bytes:
    """Bytes grouped by position within the item (all first bytes, then all second bytes...)."""
    return raw.view(np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(buf: bytes, itemsize: int) -> np.ndarray:
    return np.ascontiguousarray(np.frombuffer(buf, np.uint8).reshape(itemsize, -1).T)


def _encode_column(name: str, arr: np.ndarray) -> tuple[dict, bytes]:
    """The smallest of: shuffled bytes, or shuffled deltas of the bit patterns along the step axis."""
    a = np.ascontiguousarray(arr)
    if a.dtype.kind not in "biufc":
        raise StoreError(f"step column {name!r} has dtype {a.dtype}; only numeric columns can be stored")
    size = a.dtype.itemsize
    best = zlib.compress(_shuffle(a, size), _ZLEVEL)
    enc = "s"
    if size in _UINT and a.shape[0] > 1:
        u = a.view(_UINT[size])
        d = u.copy()
        np.subtract(u[1:], u[:-1], out=d[1:])  # wraps modulo 2**bits: exactly reversible
        packed = zlib.compress(_shuffle(d, size), _ZLEVEL)
        if len(packed) < len(best):
            best, enc = packed, "ds"
    meta = {"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "enc": enc, "len": len(best)}
    return meta, best


def _decode_column(meta: dict, payload: bytes) -> np.ndarray:
    dtype = np.dtype(meta["dtype"])
    shape = tuple(meta["shape"])
    raw = _unshuffle(zlib.decompress(payload), dtype.itemsize)
    if meta["enc"] == "ds":
        u = raw.view(_UINT[dtype.itemsize]).reshape(shape)
        u = np.cumsum(u, axis=0, dtype=u.dtype)
        return u.view(dtype).reshape(shape)
    if meta["enc"] != "s":
        raise StoreError(f"unknown column encoding {meta['enc']!r}; the store was written by a newer lrviz")
    return raw.view(dtype).reshape(shape)


def _loss_stats(loss: np.ndarray | None) -> tuple[float | None, float | None]:
    """(lowest, last) finite value of a loss column, or None when it has none."""
    if loss is None:
        return None, None
    values = np.asarray(loss, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None
    return float(finite.min()), float(finite[-1])


# --------------------------------------------------------------------------- helpers


def _pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists on this machine."""
    if not pid or pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else
        return True
    return True


def _resolve_path(path: str | os.PathLike | None) -> Path:
    """The absolute path of the database file: a script that changes the working folder later
    (``os.chdir``) must not move the store or its checkpoints."""
    p = RunStore.default_path() if path is None else Path(path).expanduser()
    p = p.resolve()
    if p.is_dir() or (not p.exists() and p.suffix.lower() not in _DB_SUFFIXES):
        return p / DB_NAME
    return p


def _run_id(run_id: Any) -> int:
    if isinstance(run_id, bool) or not isinstance(run_id, (int, np.integer)):
        raise StoreError(f"a run id must be an integer, not {run_id!r}")
    return int(run_id)


class RunStore:
    """The database of runs; safe to share between threads, and between processes on one file.

    Every write is one transaction; group several (a writer flush) with :meth:`batch`.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        """Open (creating when missing) the store at ``path``: a database file, or a folder that
        holds ``runs.sqlite``; the default is :meth:`default_path`. Runs left 'running' or
        'paused' by a process that died are marked 'interrupted'."""
        self.path: Path = _resolve_path(path)
        self.root: Path = self.path.parent
        self._lock = threading.RLock()
        self._depth = 0
        self._conn: sqlite3.Connection | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder of the run store {self.path}: {exc.strerror or exc}; "
                "pass a writable path or set LRVIZ_HOME to a writable folder"
            ) from exc
        if self.path.is_dir():
            raise StoreError(
                f"the run store {self.path} is a folder; pass a database file or its parent folder"
            )
        #: True when the store could only be opened for reading (a read-only file or folder): runs can
        #: be listed and exported, not recorded.
        self.read_only = False
        try:
            self._open("rwc")
        except StoreError as exc:
            if exc.kind != "read-only" or not self.path.is_file():
                raise
            self._open_read_only(exc)
        try:
            self.mark_interrupted()
        except StoreError as exc:  # read-only, or a writer holding the lock: still readable
            if exc.kind == "damaged":
                self.close()
                raise
            log.info("%s", exc)
        except BaseException:
            self.close()
            raise
        log.debug("opened run store %s", self.path)

    # ------------------------------------------------------------------ lifecycle

    def _open(self, mode: str) -> None:
        """Connect with SQLite URI ``mode`` (rwc, ro) or ``immutable`` and check the schema."""
        query = "immutable=1" if mode == "immutable" else f"mode={mode}"
        try:
            self._conn = sqlite3.connect(
                f"{self.path.as_uri()}?{query}", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._translate(exc, "opening it") from exc
        try:
            self._setup(writable=mode == "rwc")
        except BaseException:
            self.close()
            raise

    def _open_read_only(self, why: StoreError) -> None:
        """Open a store that cannot be written, for reading. A WAL database in a folder that cannot be
        written opens only as ``immutable`` (SQLite cannot create its ``-shm`` file), which is safe only
        when no ``-wal`` file holds commits the database file lacks: otherwise ``why`` is raised."""
        try:
            self._open("ro")
        except StoreError:
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise why from None
            self._open("immutable")
        self.read_only = True
        log.info("run store %s opened read-only (%s)", self.path, why)

    def require_writable(self) -> None:
        """Raise StoreError unless runs can be recorded in this store."""
        if self.read_only or not (os.access(self.path, os.W_OK) and os.access(self.root, os.W_OK)):
            raise StoreError(
                f"the run store {self.path} is read-only (its file or folder cannot be written): its runs "
                "can be listed and exported, but a new run needs a writable store; pass --store PATH or "
                "set LRVIZ_HOME to a writable folder",
                kind="read-only",
            )

    @staticmethod
    def resolve_path(path: str | os.PathLike | None = None) -> Path:
        """The absolute path of the database file that ``RunStore(path)`` opens."""
        return _resolve_path(path)

    @classmethod
    def default_path(cls) -> Path:
        """``$LRVIZ_HOME/runs.sqlite`` when LRVIZ_HOME is set, else in the user's data folder."""
        home = os.environ.get("LRVIZ_HOME")
        if home:
            return Path(home).expanduser() / DB_NAME
        import platformdirs

        return Path(platformdirs.user_data_dir("lrviz")) / DB_NAME

    def _setup(self, writable: bool = True) -> None:
        with self._op("opening it") as conn:
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                # A new file (setting it later needs the write lock and has no effect): lets
                # delete_run give the space back.
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal" and writable:  # read-only (immutable) reports 'delete'
                log.warning("run store %s: journal mode is %s, not WAL (network folder?)", self.path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:  # new (or foreign) file: create the schema under the write lock
                with self.batch():
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    if version == 0:
                        self._create_schema(conn)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the run store {self.path} was written by a newer lrviz (schema {version}, "
                    f"this one reads {SCHEMA_VERSION}); upgrade lrviz or use another store"
                )

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(
                f"{self.path} is an SQLite database but not an lrviz run store; "
                "pass another path or set LRVIZ_HOME to another folder"
            )
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        log.info("created run store %s", self.path)

    def close(self) -> None:
        """Close the connection (pending WAL content is folded into the database file)."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as exc:  # pragma: no cover - nothing to do about it
                    log.warning("closing run store %s: %s", self.path, exc)

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # ------------------------------------------------------------------ transactions

    def _translate(self, exc: sqlite3.Error, what: str) -> StoreError:
        text = str(exc)
        low = text.lower()
        if "locked" in low or "busy" in low:
            return StoreError(
                f"the run store {self.path} stayed locked by another writer (another lrviz process?) for "
                f"{BUSY_TIMEOUT_S:.0f} s while {what}; try again",
                kind="busy",
            )
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return StoreError(
                f"{self.path} is damaged or not an lrviz run store ({text}) [while {what}]; move the file "
                "aside (a new store is then created) or set LRVIZ_HOME to another folder",
                kind="damaged",
            )
        if (
            "readonly" in low
            or "read-only" in low
            or "unable to open" in low
            or "disk i/o" in low
            or "disk is full" in low
        ):
            return StoreError(
                f"cannot write the run store {self.path} ({text}) [while {what}]; check the permissions and "
                "free space of its folder, or set LRVIZ_HOME to a writable folder",
                kind="read-only",
            )
        return StoreError(f"run store {self.path}: {what} failed: {text}")

    @contextmanager
    def _op(self, what: str) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with SQLite failures raised as StoreError."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"the run store {self.path} is closed")
            try:
                yield conn
            except sqlite3.Error as exc:
                raise self._translate(exc, what) from exc

    @contextmanager
    def batch(self) -> Iterator[RunStore]:
        """One transaction for every write inside; nested batches join the outer one (a failure
        inside a nested batch undoes only that batch when the exception is caught)."""
        with self._lock:
            with self._op("starting a transaction") as conn:
                depth = self._depth
                conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT sp{depth}")
            self._depth = depth + 1
            try:
                yield self
            except BaseException:
                self._depth = depth
                try:
                    if depth == 0:
                        conn.execute("ROLLBACK")
                    else:
                        conn.execute(f"ROLLBACK TO sp{depth}")
                        conn.execute(f"RELEASE sp{depth}")
                except sqlite3.Error as exc:  # pragma: no cover - already failing
                    log.warning("run store %s: rollback failed: %s", self.path, exc)
                raise
            self._depth = depth
            with self._op("committing a transaction"):
                try:
                    conn.execute("COMMIT" if depth == 0 else f"RELEASE sp{depth}")
                except sqlite3.Error:
                    if depth == 0 and conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._op(what) as conn, self.batch():
            yield conn

    def _unknown(self, ref: Any) -> StoreError:
        return StoreError(f"no run '{ref}' in {self.path}; `lrviz runs` lists them")

    def _check_run(self, conn: sqlite3.Connection, run_id: int) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone() is None:
            raise self._unknown(run_id)

    # ------------------------------------------------------------------ runs

    def mark_interrupted(self) -> list[int]:
        """Mark 'running'/'paused' runs whose process is gone, or whose heartbeat is older than
        60 s, as 'interrupted'; the ids marked. Done on open; a long-lived reader may repeat it."""
        now = time.time()
        with self._op("checking for interrupted runs") as conn:
            rows = conn.execute(
                "SELECT id, pid, COALESCE(heartbeat_at, started_at, created_at) FROM runs "
                "WHERE status IN ('running', 'paused')"
            ).fetchall()
        dead = [
            (run_id, seen)
            for run_id, pid, seen in rows
            if not (_pid_alive(pid) and seen is not None and now - seen <= STALE_AFTER_S)
        ]
        marked: list[int] = []
        if not dead:  # the usual case: no write lock needed to open a store
            return marked
        with self._write("marking interrupted runs") as conn:
            for run_id, seen in dead:
                cur = conn.execute(
                    "UPDATE runs SET status='interrupted', ended_at=? WHERE id=? AND "
                    "status IN ('running', 'paused') AND COALESCE(heartbeat_at, started_at, created_at) IS ?",
                    (now if seen is None else min(now, seen), run_id, seen),
                )
                if cur.rowcount:  # not revived meanwhile by a heartbeat
                    marked.append(run_id)
        if marked:
            log.info("run store %s: marked runs %s interrupted", self.path, marked)
        return marked

    def create_run(
        self,
        *,
        script_path: str,
        script_hash: str,
        config: dict,
        device: str,
        name: str | None = None,
        parent_id: int | None = None,
        fork_step: int | None = None,
    ) -> int:
        """Add a run in status 'created' owned by this process; its id. The default name is
        ``"<script stem> #<id>"``."""
        now = time.time()
        with self._write("creating a run") as conn:
            if parent_id is not None:
                self._check_run(conn, _run_id(parent_id))
            cur = conn.execute(
                "INSERT INTO runs (name, script_path, script_hash, config, device, status, created_at, "
                "summary, parent_id, fork_step, pid) VALUES (?, ?, ?, ?, ?, 'created', ?, '{}', ?, ?, ?)",
                (
                    name or "",
                    str(script_path),
                    str(script_hash),
                    _dumps(config or {}),
                    str(device),
                    now,
                    None if parent_id is None else int(parent_id),
                    None if fork_step is None else int(fork_step),
                    os.getpid(),
                ),
            )
            run_id = int(cur.lastrowid)
            if not name:
                stem = Path(str(script_path)).stem or "run"
                conn.execute("UPDATE runs SET name=? WHERE id=?", (f"{stem} #{run_id}", run_id))
        return run_id

    def set_status(
        self, run_id: int, status: str, *, error: str | None = None, summary: dict | None = None
    ) -> None:
        """Change a run's status. 'running' records ``started_at`` (first time only), this process
        as the run's pid, and clears ``ended_at``; terminal statuses record ``ended_at``. ``error``
        replaces the stored error when given; ``summary`` is merged into the stored summary."""
        if status not in RUN_STATUSES:
            raise StoreError(f"unknown run status {status!r}; one of {', '.join(RUN_STATUSES)}")
        run_id = _run_id(run_id)
        now = time.time()
        with self._write("setting a run's status") as conn:
            row = conn.execute("SELECT summary FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise self._unknown(run_id)
            sets = ["status=?", "heartbeat_at=?"]
            args: list[Any] = [status, now]
            if status == "running":
                sets += ["started_at=COALESCE(started_at, ?)", "ended_at=NULL", "pid=?"]
                args += [now, os.getpid()]
            elif status in TERMINAL_STATUSES:
                sets.append("ended_at=?")
                args.append(now)
            if error is not None:
                sets.append("error=?")
                args.append(str(error))
            if summary is not None:
                merged = _loads(row[0], f"the summary of run {run_id} in {self.path}")
                merged.update(_jsonable(summary))
                sets.append("summary=?")
                args.append(_dumps(merged))
            conn.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id=?", (*args, run_id))

    def heartbeat(self, run_id: int) -> None:
        """Record that the run's process is alive (call at least every 60 s while running or paused)."""
        run_id = _run_id(run_id)
        with self._write("recording a heartbeat") as conn:
            if conn.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (time.time(), run_id)).rowcount == 0:
                raise self._unknown(run_id)

    def list_runs(self) -> list[RunInfo]:
        """Every run, newest first."""
        with self._op("listing runs") as conn:
            rows = conn.execute(
                f"SELECT {_RUN_FIELDS} FROM runs ORDER BY created_at DESC, id DESC"
            ).fetchall()
        out = []
        for row in rows:
            try:
                out.append(self._info(row))
            except StoreError as exc:  # list the run anyway: one damaged field must not hide the others
                log.warning("%s", exc)
                out.append(self._info(row, damaged_ok=True))
        return out

    def get_run(self, ref: int | str) -> RunInfo:
        """The run with this id, or with this name (a string of digits that names no run is taken as
        an id; ``"#12"`` too)."""
        with self._op("reading a run") as conn:
            if isinstance(ref, str):
                rows = conn.execute(
                    f"SELECT {_RUN_FIELDS} FROM runs WHERE name=? ORDER BY id", (ref,)
                ).fetchall()
                if len(rows) > 1:
                    ids = ", ".join(str(r[0]) for r in rows)
                    raise StoreError(
                        f"several runs are named '{ref}' in {self.path} (ids {ids}); give the id"
                    )
                if rows:
                    return self._info(rows[0])
                text = ref.strip().removeprefix("#")
                if not text.isdigit():
                    raise self._unknown(ref)
                run_id = int(text)
            else:
                run_id = _run_id(ref)
            row = conn.execute(f"SELECT {_RUN_FIELDS} FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise self._unknown(ref)
        return self._info(row)

    def _info(self, row: tuple, damaged_ok: bool = False) -> RunInfo:
        """A RunInfo from a row; a damaged JSON field is a StoreError, or ``{}`` with ``damaged_ok``."""
        (run_id, name, script_path, script_hash, config, device, status, created_at, started_at, ended_at,
         steps, best, final, summary, error, parent_id, fork_step, pid, heartbeat_at) = row  # fmt: skip

        def field(text: str, which: str) -> Any:
            try:
                return _loads(text, f"the {which} of run {run_id} in {self.path}")
            except StoreError:
                if damaged_ok:
                    return {}
                raise
        return RunInfo(
            id=run_id,
            name=name,
            script_path=script_path,
            script_hash=script_hash,
            config=field(config, "config"),
            device=device,
            status=status,
            created_at=created_at,
            started_at=started_at,
            ended_at=ended_at,
            steps=steps,
            best_loss=best,
            final_loss=final,
            summary=field(summary, "summary"),
            error=error,
            parent_id=parent_id,
            fork_step=fork_step,
            pid=pid,
            heartbeat_at=heartbeat_at,
        )

    def rename_run(self, run_id: int, name: str) -> None:
        """Give a run another name (names may repeat; look-up by an ambiguous name then fails)."""
        run_id = _run_id(run_id)
        name = str(name).strip()
        if not name:
            raise StoreError("a run name cannot be empty")
        with self._write("renaming a run") as conn:
            if conn.execute("UPDATE runs SET name=? WHERE id=?", (name, run_id)).rowcount == 0:
                raise self._unknown(run_id)

    def delete_run(self, run_id: int) -> None:
        """Remove a run: its steps, events, validation points and checkpoint folder. Runs forked
        from it keep their data and lose their parent."""
        run_id = _run_id(run_id)
        with self._write("deleting a run") as conn:
            for table in ("chunks", "events", "validation"):
                conn.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
            if conn.execute("DELETE FROM runs WHERE id=?", (run_id,)).rowcount == 0:
                raise self._unknown(run_id)
        try:
            with self._op("freeing the space of a deleted run") as conn:
                if self._depth == 0:  # not inside a caller's batch (executescript would commit it)
                    conn.executescript("PRAGMA incremental_vacuum;")  # execute() frees one page only
        except StoreError as exc:  # the run is gone; the space is reused later anyway
            log.warning("%s", exc)
        folder = self._checkpoint_path(run_id)
        if folder.exists():
            try:
                shutil.rmtree(folder)
            except OSError as exc:
                raise StoreError(
                    f"run {run_id} was deleted but its checkpoint folder {folder} was not: {exc}"
                ) from exc

    def _checkpoint_path(self, run_id: int) -> Path:
        return self.root / "checkpoints" / str(run_id)

    def checkpoint_dir(self, run_id: int) -> Path:
        """The folder for the run's checkpoint files (created when missing)."""
        run_id = _run_id(run_id)
        with self._op("finding a checkpoint folder") as conn:
            self._check_run(conn, run_id)
        folder = self._checkpoint_path(run_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the checkpoint folder {folder}: {exc.strerror or exc}") from exc
        return folder

    def integrity_ok(self) -> bool:
        """Whether SQLite's full integrity check finds nothing wrong."""
        try:
            with self._op("checking integrity") as conn:
                rows = conn.execute("PRAGMA integrity_check").fetchall()
        except StoreError as exc:
            log.warning("%s", exc)
            return False
        return [r[0] for r in rows] == ["ok"]

    # ------------------------------------------------------------------ per-step series

    def append_steps(self, run_id: int, start_step: int, columns: Mapping[str, np.ndarray]) -> None:
        """Store one chunk: steps ``start_step .. start_step+n-1``, every array with first
        dimension ``n``. Appending again at an already stored start step replaces that chunk; a
        chunk overlapping others otherwise is refused. A ``step`` column, if given, must match."""
        run_id = _run_id(run_id)
        start = int(start_step)
        if start < 0:
            raise StoreError(f"start step must be >= 0, not {start}")
        arrays: dict[str, np.ndarray] = {}
        n: int | None = None
        for name, value in columns.items():
            a = np.asarray(value)
            if a.ndim == 0:
                raise StoreError(f"step column {name!r} is a scalar; it needs one row per step")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise StoreError(
                    f"step columns differ in length ({name!r} has {a.shape[0]} rows, others {n})"
                )
            arrays[str(name)] = a
        if not n:
            return
        step_col = arrays.pop("step", None)
        if step_col is not None and not np.array_equal(step_col, np.arange(start, start + n)):
            raise StoreError(f"the 'step' column does not run {start}..{start + n - 1}")
        if not arrays:
            return
        metas: list[dict] = []
        payloads: list[bytes] = []
        for name, a in arrays.items():
            meta, payload = _encode_column(name, a)
            metas.append(meta)
            payloads.append(payload)
        header = json.dumps({"n": n, "cols": metas}, separators=(",", ":"))
        blob = b"".join(payloads)
        loss_min, loss_last = _loss_stats(arrays.get(LOSS_COLUMN))

        with self._write("storing steps") as conn:
            self._check_run(conn, run_id)
            end = start + n
            prev = conn.execute(
                "SELECT start_step, n FROM chunks WHERE run_id=? AND start_step<? ORDER BY start_step DESC LIMIT 1",
                (run_id, start),
            ).fetchone()
            nxt = conn.execute(
                "SELECT start_step FROM chunks WHERE run_id=? AND start_step>? AND start_step<? LIMIT 1",
                (run_id, start, end),
            ).fetchone()
            if (prev and prev[0] + prev[1] > start) or nxt:
                other = (
                    f"{prev[0]}..{prev[0] + prev[1] - 1}"
                    if prev and prev[0] + prev[1] > start
                    else f"{nxt[0]}.."
                )
                raise StoreError(
                    f"run {run_id}: steps {start}..{end - 1} overlap stored steps {other}; "
                    "steps are appended once each"
                )
            replaced = conn.execute(
                "DELETE FROM chunks WHERE run_id=? AND start_step=?", (run_id, start)
            ).rowcount
            conn.execute(
                "INSERT INTO chunks (run_id, start_step, n, loss_min, loss_last, header, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, start, n, loss_min, loss_last, header, blob),
            )
            last = conn.execute("SELECT MAX(start_step) FROM chunks WHERE run_id=?", (run_id,)).fetchone()[0]
            if replaced or last != start:  # rare: recompute the run's figures from all chunks
                conn.execute(
                    "UPDATE runs SET steps=(SELECT COALESCE(SUM(n), 0) FROM chunks WHERE run_id=:r), "
                    "best_loss=(SELECT MIN(loss_min) FROM chunks WHERE run_id=:r), "
                    "final_loss=(SELECT loss_last FROM chunks WHERE run_id=:r AND loss_last IS NOT NULL "
                    "ORDER BY start_step DESC LIMIT 1) WHERE id=:r",
                    {"r": run_id},
                )
            else:
                conn.execute(
                    "UPDATE runs SET steps=steps+?, "
                    "best_loss=CASE WHEN best_loss IS NULL OR ?<best_loss THEN COALESCE(?, best_loss) "
                    "ELSE best_loss END, final_loss=COALESCE(?, final_loss) WHERE id=?",
                    (n, loss_min, loss_min, loss_last, run_id),
                )

    def truncate_run(self, run_id: int, from_step: int) -> None:
        """Forget everything a run recorded from ``from_step`` on (steps, events, validation points
        measured after later updates), so it can resume from a checkpoint taken at that step."""
        run_id = _run_id(run_id)
        k = int(from_step)
        keep = self.load_steps(run_id, 0, k)
        with self.batch(), self._write("truncating the run") as conn:
            self._check_run(conn, run_id)
            straddle = conn.execute(
                "SELECT start_step FROM chunks WHERE run_id=? AND start_step<? AND start_step+n>? ",
                (run_id, k, k)).fetchone()
            conn.execute("DELETE FROM chunks WHERE run_id=? AND start_step>=?", (run_id, k))
            conn.execute("DELETE FROM events WHERE run_id=? AND step>=?", (run_id, k))
            conn.execute("DELETE FROM validation WHERE run_id=? AND step>=?", (run_id, k))
            if straddle is not None:
                s0 = int(straddle[0])
                conn.execute("DELETE FROM chunks WHERE run_id=? AND start_step=?", (run_id, s0))
            conn.execute(
                "UPDATE runs SET steps=(SELECT COALESCE(SUM(n), 0) FROM chunks WHERE run_id=:r), "
                "best_loss=(SELECT MIN(loss_min) FROM chunks WHERE run_id=:r), "
                "final_loss=(SELECT loss_last FROM chunks WHERE run_id=:r AND loss_last IS NOT NULL "
                "ORDER BY start_step DESC LIMIT 1) WHERE id=:r",
                {"r": run_id},
            )
            if straddle is not None:
                lo = np.searchsorted(keep["step"], s0)
                part = {name: a[lo:] for name, a in keep.items() if name != "step"}
                self.append_steps(run_id, s0, part)

    def load_steps(
        self, run_id: int, start: int = 0, stop: int | None = None, *, columns: Iterable[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Steps ``start <= step < stop`` as one array per column plus ``step`` (int64), with the
        stored dtypes. ``columns`` limits which columns are decoded. A column missing from some
        chunks is filled with NaN there (as float64 when its dtype is integer). With no stored step
        in range the arrays are empty (the standard columns when the run has no steps at all)."""
        run_id = _run_id(run_id)
        start = max(0, int(start))
        wanted = None if columns is None else set(columns)
        with self._op("reading steps") as conn:
            self._check_run(conn, run_id)
            if stop is not None and int(stop) <= start:
                rows = []
            else:
                first = conn.execute(
                    "SELECT MAX(start_step) FROM chunks WHERE run_id=? AND start_step<=?", (run_id, start)
                ).fetchone()[0]
                lo = start if first is None else first
                if stop is None:
                    rows = conn.execute(
                        "SELECT start_step, n, header, data FROM chunks WHERE run_id=? AND start_step>=? "
                        "ORDER BY start_step",
                        (run_id, lo),
                    ).fetchall()
                else:
                    rows = conn.execute(
                        "SELECT start_step, n, header, data FROM chunks WHERE run_id=? AND start_step>=? "
                        "AND start_step<? ORDER BY start_step",
                        (run_id, lo, int(stop)),
                    ).fetchall()
                rows = [r for r in rows if r[0] + r[1] > start]
            if not rows:
                any_chunk = conn.execute(
                    "SELECT header FROM chunks WHERE run_id=? ORDER BY start_step DESC LIMIT 1", (run_id,)
                ).fetchone()
        if not rows:
            return self._empty(None if any_chunk is None else json.loads(any_chunk[0]), wanted)

        decoded: list[tuple[int, int, dict[str, np.ndarray]]] = []
        for chunk_start, n, header, data in rows:
            cols: dict[str, np.ndarray] = {}
            offset = 0
            try:
                for meta in json.loads(header)["cols"]:
                    length = meta["len"]
                    if wanted is None or meta["name"] in wanted:
                        cols[meta["name"]] = _decode_column(meta, data[offset : offset + length])
                    offset += length
            except (ValueError, KeyError, TypeError, zlib.error) as exc:
                raise StoreError(
                    f"the steps {chunk_start}..{chunk_start + n - 1} of run {run_id} in {self.path} are damaged "
                    f"({type(exc).__name__}: {exc}); the run's other data is readable",
                    kind="damaged",
                ) from None
            decoded.append((chunk_start, n, cols))

        step = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n, _ in decoded])
        lo_i = int(np.searchsorted(step, start, side="left"))
        hi_i = len(step) if stop is None else int(np.searchsorted(step, int(stop), side="left"))
        out: dict[str, np.ndarray] = {"step": step[lo_i:hi_i]}
        names: list[str] = []
        for _, _, cols in decoded:
            names.extend(k for k in cols if k not in names)
        for name in names:
            out[name] = self._concat(name, decoded, len(step))[lo_i:hi_i]
        if wanted is not None and "step" not in wanted:
            del out["step"]
        return out

    @staticmethod
    def _concat(name: str, decoded: list[tuple[int, int, dict[str, np.ndarray]]], total: int) -> np.ndarray:
        parts = [cols.get(name) for _, _, cols in decoded]
        present = [p for p in parts if p is not None]
        trails = {p.shape[1:] for p in present}
        if len(present) == len(parts) and len(trails) == 1:
            return present[0] if len(present) == 1 else np.concatenate(present)
        # Missing in some chunks, or the number of groups changed: pad with NaN.
        ndim = max(len(t) for t in trails)
        trail = tuple(max((t[i] if i < len(t) else 1) for t in trails) for i in range(ndim))
        dtype = np.result_type(*present)
        if dtype.kind not in "fc":
            dtype = np.result_type(dtype, np.float64)
        out = np.full((total, *trail), np.nan, dtype=dtype)
        row = 0
        for (_, n, _), part in zip(decoded, parts, strict=True):
            if part is not None:
                part = part.reshape(n, *part.shape[1:], *([1] * (ndim - part.ndim + 1)))
                out[(slice(row, row + n), *(slice(0, s) for s in part.shape[1:]))] = part
            row += n
        return out

    @staticmethod
    def _empty(header: dict | None, wanted: set[str] | None) -> dict[str, np.ndarray]:
        if header is None:
            spec = dict(EMPTY_COLUMNS)
        else:
            spec = {"step": EMPTY_COLUMNS["step"]}
            spec.update({m["name"]: (m["dtype"], tuple(m["shape"][1:])) for m in header["cols"]})
        return {
            name: np.empty((0, *trail), dtype=np.dtype(dt))
            for name, (dt, trail) in spec.items()
            if wanted is None or name in wanted
        }

    # ------------------------------------------------------------------ events and validation

    def add_events(self, run_id: int, events: Iterable[Event]) -> None:
        """Store events (anything with ``step``, ``kind``, ``data`` and ``time``)."""
        run_id = _run_id(run_id)
        rows = [(run_id, int(e.step), str(e.kind), _dumps(e.data or {}), float(e.time)) for e in events]
        if not rows:
            return
        with self._write("storing events") as conn:
            self._check_run(conn, run_id)
            conn.executemany(
                "INSERT INTO events (run_id, step, kind, data, time) VALUES (?, ?, ?, ?, ?)", rows
            )

    def add_validation(self, run_id: int, points: Iterable[ValPoint]) -> None:
        """Store validation points (a NaN accuracy is read back as None)."""
        run_id = _run_id(run_id)
        rows = [
            (
                run_id,
                int(p.step),
                int(p.epoch),
                float(p.loss),
                None if p.accuracy is None else float(p.accuracy),
                float(p.time),
            )
            for p in points
        ]
        if not rows:
            return
        with self._write("storing validation points") as conn:
            self._check_run(conn, run_id)
            conn.executemany(
                "INSERT INTO validation (run_id, step, epoch, loss, accuracy, time) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def load_events(self, run_id: int) -> list[Event]:
        """The run's events in step order (then in the order stored)."""
        run_id = _run_id(run_id)
        with self._op("reading events") as conn:
            self._check_run(conn, run_id)
            rows = conn.execute(
                "SELECT step, kind, data, time FROM events WHERE run_id=? ORDER BY step, id", (run_id,)
            ).fetchall()
        return [Event(step=s, kind=k, data=_loads(d, f"an event of run {run_id} in {self.path}"), time=t)
                for s, k, d, t in rows]

    def load_validation(self, run_id: int) -> list[ValPoint]:
        """The run's validation points in step order (a non-finite loss is read back as NaN)."""
        run_id = _run_id(run_id)
        with self._op("reading validation points") as conn:
            self._check_run(conn, run_id)
            rows = conn.execute(
                "SELECT step, epoch, loss, accuracy, time FROM validation WHERE run_id=? ORDER BY step, id",
                (run_id,),
            ).fetchall()
        return [
            ValPoint(step=s, epoch=e, loss=math.nan if loss is None else loss, accuracy=acc, time=t)
            for s, e, loss, acc, t in rows
        ]
