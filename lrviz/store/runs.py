"""The run store: an embedded SQLite database of training runs, their per-step series,
validation points, events and extra scalar series.

One file (``runs.sqlite``, WAL journal) shared by the threads of one process and by several
processes (the app and the CLI). Checkpoints of run ``N`` live beside it in ``checkpoints/N/``.
Its parts: this module, :class:`RunStore` (every public method one transaction on the shared
connection); :mod:`lrviz.store.schema`, the schema as migration steps; :mod:`lrviz.store.codec`, how
JSON fields and the compressed column chunks are encoded. The module is long because the class is:
splitting the transactions of one connection across files would hide what each one touches.

Per-step series are stored as chunks: one row per ``append_steps`` call. Extra scalar series (any
named value logged at some steps: ``val_accuracy``, a TensorBoard tag) are chunks of
``step``/``value``/``time`` columns; a series logged a few points at a time is folded into chunks of
up to :data:`SCALAR_CHUNK` points.

The schema is versioned (``PRAGMA user_version``): a store written by an older lrviz is upgraded when
it is opened, one migration step per transaction; a store that cannot be written is upgraded in a
private temporary copy, for reading. A store written by a newer lrviz opens read-only when its schema
says this version can still read it, and is refused otherwise.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrviz.errors import ConfigError, StoreError
from lrviz.records import Event, ValPoint
from lrviz.store.codec import dumps, jsonable, loads, loss_stats, pack, unpack
from lrviz.store.schema import MIGRATIONS, SCHEMA_VERSION, Migration, statements

__all__ = [
    "MIGRATIONS",
    "RUN_KINDS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "TERMINAL_STATUSES",
    "Event",
    "Migration",
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
DB_NAME = "runs.sqlite"
LOSS_COLUMN = "loss"
#: Who made a run: 'lrviz' trained it, 'tracked' is a user's own loop (``lrviz.track``), 'imported' came
#: from another tool's logs (TensorBoard) and is read-only: it cannot be resumed, forked or replayed.
RUN_KINDS = ("lrviz", "tracked", "imported")
#: The fields of a live endpoint kept in a run's row (never its token).
ENDPOINT_FIELDS = ("transport", "address", "port", "pid", "hostname")
#: A scalar series logged a few points at a time is folded into chunks of up to this many points.
SCALAR_CHUNK = 4096
_DB_SUFFIXES = (".sqlite", ".sqlite3", ".db")

#: Columns (dtype, shape after the step axis) returned empty for a run without steps.
EMPTY_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "step": ("<i8", ()),
    "epoch": ("<i4", ()),
    "time": ("<f8", ()),
    "loss": ("<f8", ()),
    "grad_norm": ("<f4", ()),
    "lr": ("<f8", (1,)),
}


#: A run's figures (stored steps, best and last finite loss) from its chunks.
_RECOUNT_RUN = (
    "UPDATE runs SET steps=(SELECT COALESCE(SUM(n), 0) FROM chunks WHERE run_id=:r), "
    "best_loss=(SELECT MIN(loss_min) FROM chunks WHERE run_id=:r), "
    "final_loss=(SELECT loss_last FROM chunks WHERE run_id=:r AND loss_last IS NOT NULL "
    "ORDER BY start_step DESC LIMIT 1) WHERE id=:r"
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
    kind: str = "lrviz"
    """Who made the run: one of :data:`RUN_KINDS`."""
    endpoint: dict | None = None
    """Where the run is served live while it trains (:data:`ENDPOINT_FIELDS`, never the token), else None."""

    @property
    def read_only(self) -> bool:
        """Whether the run is a record of another tool's (imported): it can be viewed, not trained on."""
        return self.kind == "imported"

    def require_trainable(self, action: str) -> None:
        """Raise ConfigError when the run cannot be ``action`` ('resumed', 'forked', 'replayed')."""
        if self.read_only:
            raise ConfigError(
                f"run {self.id} ({self.name}) was imported from {self.script_path} and is read-only: it "
                f"cannot be {action}, since lrviz has neither its script nor its checkpoints; it can be "
                "listed, viewed, overlaid and exported"
            )


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
        #: True when the store could only be opened for reading (a read-only file or folder, or one written
        #: by a newer lrviz): runs can be listed and exported, not recorded.
        self.read_only = False
        #: Why the store is read-only (None when it is not): the end of the message that refuses a write.
        self.read_only_reason: str | None = None
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
        """Connect with SQLite URI ``mode`` (rwc, ro) or ``immutable``; check and upgrade the schema."""
        query = "immutable=1" if mode == "immutable" else f"mode={mode}"
        try:
            self._conn = self._connect(f"{self.path.as_uri()}?{query}")
        except sqlite3.Error as exc:
            raise self._translate(exc, "opening it") from exc
        try:
            self._setup(writable=mode == "rwc")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _connect(uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        # SQLite then checks a page's cell offsets and sizes as it reads the page: without it, a damaged cell
        # pointer is followed to the page's end and the record decoded from whatever memory lies past it (a
        # different answer in each process: "malformed", or a row of NULLs)
        conn.execute("PRAGMA cell_size_check=ON")
        return conn

    def _open_read_only(self, why: StoreError) -> None:
        """Open a store that cannot be written, for reading. A WAL database in a folder that cannot be
        written opens only as ``immutable`` (SQLite cannot create its ``-shm`` file), which is safe only
        when no ``-wal`` file holds commits the database file lacks: otherwise ``why`` is raised."""
        self._set_read_only("its file or folder cannot be written")
        try:
            self._open("ro")
        except StoreError:
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise why from None
            self._open("immutable")
        log.info("run store %s opened read-only (%s)", self.path, why)

    def _set_read_only(self, reason: str) -> None:
        self.read_only = True
        self.read_only_reason = reason

    def require_writable(self) -> None:
        """Raise StoreError unless runs can be recorded in this store."""
        if not self.read_only and not (os.access(self.path, os.W_OK) and os.access(self.root, os.W_OK)):
            self._set_read_only("its file or folder cannot be written")
        if self.read_only:
            raise self._read_only_error()

    def _read_only_error(self) -> StoreError:
        return StoreError(
            f"the run store {self.path} is read-only ({self.read_only_reason}): its runs can be listed and "
            "exported, but a new run needs a writable store; pass --store PATH or set LRVIZ_HOME to a "
            "writable folder",
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
            if _first(conn, "PRAGMA page_count") == 0:
                # A new file (setting it later needs the write lock and has no effect): lets
                # delete_run give the space back.
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = _first(conn, "PRAGMA journal_mode=WAL")
            if str(mode).lower() != "wal" and writable:  # read-only (immutable) reports 'delete'
                log.warning("run store %s: journal mode is %s, not WAL (network folder?)", self.path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = self.schema_version()
        if version > SCHEMA_VERSION:
            self._open_newer(version)
        elif version < SCHEMA_VERSION:
            if writable:
                self._migrate()
            else:
                self._migrate_copy(version)

    def schema_version(self) -> int:
        """The version of the schema of the open file (0: a new, empty file)."""
        with self._op("reading the schema version") as conn:
            return int(_first(conn, "PRAGMA user_version"))

    def _open_newer(self, version: int) -> None:
        """A store written by a newer lrviz: read-only when its schema says this version can still read
        it (the newer steps only added things), refused otherwise."""
        with self._op("reading the schema of a newer store") as conn:
            try:
                row = _read(conn, "SELECT value FROM meta WHERE key='readable_from'", one=True)
                readable_from = int(row[0]) if row is not None else version
            except (sqlite3.OperationalError, ValueError):  # no meta table, or a damaged value
                readable_from = version
        if readable_from > SCHEMA_VERSION:
            raise StoreError(
                f"the run store {self.path} was written by a newer lrviz (schema {version}; this one knows "
                f"{SCHEMA_VERSION} and cannot read it); upgrade lrviz, or use another store: pass --store PATH "
                "or set LRVIZ_HOME to another folder"
            )
        self._set_read_only(f"it was written by a newer lrviz, schema {version}; this one writes {SCHEMA_VERSION}: "
                            "upgrade lrviz to record runs in it")
        log.info("run store %s: schema %s is newer than %s; opened read-only", self.path, version, SCHEMA_VERSION)

    def _migrate(self) -> None:
        """Run the migrations the file lacks, each in its own transaction under the write lock (another
        process may be upgrading the same file: each step re-reads the version once it holds the lock)."""
        while True:
            with self._op("upgrading the schema") as conn, self.batch():
                version = self.schema_version()
                if version >= SCHEMA_VERSION:
                    return
                if version == 0 and _first(conn, "SELECT count(*) FROM sqlite_master"):
                    raise StoreError(
                        f"{self.path} is an SQLite database but not an lrviz run store; "
                        "pass another path or set LRVIZ_HOME to another folder"
                    )
                self._apply(conn, MIGRATIONS[version])
            if version:
                log.info("run store %s: upgraded the schema from version %s to %s (%s)", self.path, version,
                         version + 1, MIGRATIONS[version].what)
            else:
                log.info("created run store %s", self.path)

    @staticmethod
    def _apply(conn: sqlite3.Connection, step: Migration) -> None:
        if callable(step.apply):
            step.apply(conn)
        else:
            for statement in statements(step.apply):
                conn.execute(statement)
        if step.breaks_readers:
            conn.execute("UPDATE meta SET value=? WHERE key='readable_from'", (str(step.version),))
        conn.execute(f"PRAGMA user_version={step.version}")

    def _migrate_copy(self, version: int) -> None:
        """A store written by an older lrviz that cannot be written: read a private temporary copy of it
        (SQLite deletes it when the connection closes), upgraded; the file itself stays as it is."""
        if version == 0:
            raise StoreError(f"{self.path} is not an lrviz run store (no schema) and cannot be written; "
                             "pass another path or set LRVIZ_HOME to another folder")
        with self._op("copying an older store to read it") as conn:
            copy = self._connect("file:?mode=rwc")  # "": a temporary database on disk, private to this connection
            try:
                conn.backup(copy)
            except BaseException:
                copy.close()
                raise
        self.close()
        self._conn = copy
        self._set_read_only(f"its file or folder cannot be written; it was written by an older lrviz (schema "
                            f"{version}) and is read through an upgraded temporary copy")
        self._migrate()

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
        if self.read_only:
            raise self._read_only_error()
        with self._op(what) as conn, self.batch():
            yield conn

    def _unknown(self, ref: Any) -> StoreError:
        return StoreError(f"no run '{ref}' in {self.path}; `lrviz runs` lists them")

    def _check_run(self, conn: sqlite3.Connection, run_id: int) -> None:
        if _read(conn, "SELECT 1 FROM runs WHERE id=?", (run_id,), one=True) is None:
            raise self._unknown(run_id)

    # ------------------------------------------------------------------ runs

    def mark_interrupted(self) -> list[int]:
        """Mark 'running'/'paused' runs whose process is gone, or whose heartbeat is older than
        60 s, as 'interrupted'; the ids marked. Done on open; a long-lived reader may repeat it."""
        now = time.time()
        with self._op("checking for interrupted runs") as conn:
            rows = _read(
                conn, "SELECT id, pid, COALESCE(heartbeat_at, started_at, created_at) FROM runs "
                "WHERE status IN ('running', 'paused')"
            )
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
        kind: str = "lrviz",
    ) -> int:
        """Add a run in status 'created' owned by this process; its id. The default name is
        ``"<script stem> #<id>"``. ``kind``: one of :data:`RUN_KINDS`."""
        if kind not in RUN_KINDS:
            raise StoreError(f"unknown run kind {kind!r}; one of {', '.join(RUN_KINDS)}")
        now = time.time()
        with self._write("creating a run") as conn:
            if parent_id is not None:
                self._check_run(conn, _run_id(parent_id))
            cur = conn.execute(
                "INSERT INTO runs (name, script_path, script_hash, config, device, status, created_at, "
                "summary, parent_id, fork_step, pid, kind) VALUES (?, ?, ?, ?, ?, 'created', ?, '{}', ?, ?, ?, ?)",
                (
                    name or "",
                    str(script_path),
                    str(script_hash),
                    dumps(config or {}),
                    str(device),
                    now,
                    None if parent_id is None else int(parent_id),
                    None if fork_step is None else int(fork_step),
                    os.getpid(),
                    kind,
                ),
            )
            run_id = int(cur.lastrowid)
            if not name:
                stem = Path(str(script_path)).stem or "run"
                conn.execute("UPDATE runs SET name=? WHERE id=?", (f"{stem} #{run_id}", run_id))
        return run_id

    def set_status(
        self, run_id: int, status: str, *, error: str | None = None, summary: dict | None = None,
        started_at: float | None = None, ended_at: float | None = None,
    ) -> None:
        """Change a run's status. 'running' records ``started_at`` (first time only), this process
        as the run's pid, and clears ``ended_at``; terminal statuses record ``ended_at``. ``error``
        replaces the stored error when given; ``summary`` is merged into the stored summary.
        ``started_at``/``ended_at`` record those times instead of now (an imported run's)."""
        if status not in RUN_STATUSES:
            raise StoreError(f"unknown run status {status!r}; one of {', '.join(RUN_STATUSES)}")
        run_id = _run_id(run_id)
        now = time.time()
        with self._write("setting a run's status") as conn:
            row = _read(conn, "SELECT summary FROM runs WHERE id=?", (run_id,), one=True)
            if row is None:
                raise self._unknown(run_id)
            sets = ["status=?", "heartbeat_at=?"]
            args: list[Any] = [status, now]
            if status == "running":
                sets += ["started_at=COALESCE(started_at, ?)", "ended_at=NULL", "pid=?"]
                args += [now, os.getpid()]
            elif status in TERMINAL_STATUSES:
                sets.append("ended_at=?")
                args.append(now if ended_at is None else float(ended_at))
            if started_at is not None:
                sets.append("started_at=?")
                args.append(float(started_at))
            if error is not None:
                sets.append("error=?")
                args.append(str(error))
            if summary is not None:
                merged = loads(row[0], f"the summary of run {run_id} in {self.path}")
                merged.update(jsonable(summary))
                sets.append("summary=?")
                args.append(dumps(merged))
            conn.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id=?", (*args, run_id))

    def set_endpoint(self, run_id: int, info: Any) -> None:
        """Record where the run is served live (a :class:`lrviz.live.connection.ConnectionInfo` or a
        mapping: only :data:`ENDPOINT_FIELDS` are kept, never the token), or None when it no longer is."""
        run_id = _run_id(run_id)
        if info is None:
            text = None
        else:
            data = info if isinstance(info, Mapping) else getattr(info, "to_dict", lambda: vars(info))()
            text = dumps({k: data.get(k) for k in ENDPOINT_FIELDS})
        with self._write("recording a run's endpoint") as conn:
            if conn.execute("UPDATE runs SET endpoint=? WHERE id=?", (text, run_id)).rowcount == 0:
                raise self._unknown(run_id)

    def heartbeat(self, run_id: int) -> None:
        """Record that the run's process is alive (call at least every 60 s while running or paused)."""
        run_id = _run_id(run_id)
        with self._write("recording a heartbeat") as conn:
            if conn.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (time.time(), run_id)).rowcount == 0:
                raise self._unknown(run_id)

    def list_runs(self) -> list[RunInfo]:
        """Every run, newest first."""
        with self._op("listing runs") as conn:
            rows = _read(conn, "SELECT * FROM runs ORDER BY created_at DESC, id DESC")
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
                rows = _read(conn, "SELECT * FROM runs WHERE name=? ORDER BY id", (ref,))
                if len(rows) > 1:
                    ids = ", ".join(str(r["id"]) for r in rows)
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
            row = _read(conn, "SELECT * FROM runs WHERE id=?", (run_id,), one=True)
        if row is None:
            raise self._unknown(ref)
        return self._info(row)

    #: RunInfo fields that are JSON in the row, with what they are when empty.
    _JSON_FIELDS = {"config": dict, "summary": dict, "endpoint": lambda: None}

    def _info(self, row: sqlite3.Row, damaged_ok: bool = False) -> RunInfo:
        """A RunInfo from a row of ``runs`` (read by column name, so columns a newer schema added are
        ignored); a damaged JSON field is a StoreError, or empty with ``damaged_ok``."""
        values = {key: row[key] for key in row.keys() if key in RunInfo.__dataclass_fields__}
        for key, empty in self._JSON_FIELDS.items():
            text = values.get(key)
            if not text:
                values[key] = empty()
                continue
            try:
                values[key] = loads(text, f"the {key} of run {values['id']} in {self.path}")
            except StoreError:
                if not damaged_ok:
                    raise
                values[key] = empty()
        values["kind"] = values.get("kind") or "lrviz"  # a run recorded before kinds existed
        return RunInfo(**values)

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
            for table in ("chunks", "events", "validation", "scalars"):
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
                rows = _read(conn, "PRAGMA integrity_check")
        except StoreError as exc:
            log.warning("%s", exc)
            return False
        return [r[0] for r in rows] == ["ok"]

    # ------------------------------------------------------------------ per-step series

    def append_steps(self, run_id: int, start_step: int, columns: Mapping[str, np.ndarray]) -> None:
        """Store one chunk: steps ``start_step .. start_step+n-1``, every array with first
        dimension ``n``. A ``step`` column, if given, must start at ``start_step`` and increase: steps
        that are not every integer (an imported log's) are stored with the chunk and read back as they
        were. Appending again at an already stored start step replaces that chunk; a chunk
        overlapping others otherwise is refused."""
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
        if not arrays:
            return
        stop = start + n
        if step_col is not None:
            steps = np.asarray(step_col)
            if (steps.ndim != 1 or steps.dtype.kind not in "iu" or int(steps[0]) != start
                    or (n > 1 and not bool(np.all(steps[1:] > steps[:-1])))):
                raise StoreError(f"the 'step' column must be whole numbers that start at {start} and increase")
            stop = int(steps[-1]) + 1
            if stop != start + n:  # not every integer: the chunk keeps its steps
                arrays = {"step": steps.astype(np.int64), **arrays}
        header, blob = pack(n, arrays)
        loss_min, loss_last = loss_stats(arrays.get(LOSS_COLUMN))

        with self._write("storing steps") as conn:
            self._check_run(conn, run_id)
            prev = _read(
                conn, "SELECT start_step, stop_step FROM chunks WHERE run_id=? AND start_step<? "
                "ORDER BY start_step DESC LIMIT 1",
                (run_id, start), one=True,
            )
            nxt = _read(
                conn, "SELECT start_step FROM chunks WHERE run_id=? AND start_step>? AND start_step<? LIMIT 1",
                (run_id, start, stop), one=True,
            )
            if (prev and prev[1] > start) or nxt:
                other = f"{prev[0]}..{prev[1] - 1}" if prev and prev[1] > start else f"{nxt[0]}.."
                raise StoreError(
                    f"run {run_id}: steps {start}..{stop - 1} overlap stored steps {other}; "
                    "steps are appended once each"
                )
            replaced = conn.execute(
                "DELETE FROM chunks WHERE run_id=? AND start_step=?", (run_id, start)
            ).rowcount
            conn.execute(
                "INSERT INTO chunks (run_id, start_step, stop_step, n, loss_min, loss_last, header, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, start, stop, n, loss_min, loss_last, header, blob),
            )
            last = _first(conn, "SELECT MAX(start_step) FROM chunks WHERE run_id=?", (run_id,))
            if replaced or last != start:  # rare: recompute the run's figures from all chunks
                conn.execute(_RECOUNT_RUN, {"r": run_id})
            else:
                conn.execute(
                    "UPDATE runs SET steps=steps+?, "
                    "best_loss=CASE WHEN best_loss IS NULL OR ?<best_loss THEN COALESCE(?, best_loss) "
                    "ELSE best_loss END, final_loss=COALESCE(?, final_loss) WHERE id=?",
                    (n, loss_min, loss_min, loss_last, run_id),
                )

    def truncate_run(self, run_id: int, from_step: int) -> None:
        """Forget everything a run recorded from ``from_step`` on (steps, events, validation points
        and scalars measured after later updates), so it can resume from a checkpoint taken at that step."""
        run_id = _run_id(run_id)
        k = int(from_step)
        with self.batch(), self._write("truncating the run") as conn:
            self._check_run(conn, run_id)
            straddle = _read(
                conn, "SELECT start_step FROM chunks WHERE run_id=? AND start_step<? AND stop_step>?", (run_id, k, k),
                one=True,
            )
            part = None if straddle is None else self.load_steps(run_id, straddle[0], k)
            conn.execute("DELETE FROM chunks WHERE run_id=? AND start_step>=?", (run_id, k))
            if straddle is not None:
                conn.execute("DELETE FROM chunks WHERE run_id=? AND start_step=?", (run_id, straddle[0]))
            for table in ("events", "validation"):
                conn.execute(f"DELETE FROM {table} WHERE run_id=? AND step>=?", (run_id, k))
            conn.execute(_RECOUNT_RUN, {"r": run_id})
            if part is not None:
                self.append_steps(run_id, straddle[0], part)
            self._truncate_scalars(conn, run_id, k)

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
                first = _first(
                    conn, "SELECT MAX(start_step) FROM chunks WHERE run_id=? AND start_step<=?", (run_id, start)
                )
                sql = "SELECT start_step, stop_step, n, header, data FROM chunks WHERE run_id=? AND start_step>=?"
                args: tuple = (run_id, start if first is None else first)
                if stop is not None:
                    sql += " AND start_step<?"
                    args += (int(stop),)
                rows = [r for r in _read(conn, sql + " ORDER BY start_step", args)
                        if r["stop_step"] > start]
            if not rows:
                any_chunk = _read(
                    conn, "SELECT header FROM chunks WHERE run_id=? ORDER BY start_step DESC LIMIT 1", (run_id,),
                    one=True,
                )
        if not rows:
            return self._empty(None if any_chunk is None else json.loads(any_chunk[0]), wanted)

        decode = None if wanted is None else wanted | {"step"}
        decoded: list[tuple[np.ndarray, int, dict[str, np.ndarray]]] = []
        for chunk_start, chunk_stop, n, header, data in rows:
            what = f"the steps {chunk_start}..{chunk_stop - 1} of run {run_id} in {self.path} are damaged"
            cols = unpack(header, data, what, decode)
            steps = cols.pop("step", None)
            decoded.append((np.arange(chunk_start, chunk_start + n, dtype=np.int64) if steps is None else steps,
                            n, cols))

        step = np.concatenate([steps for steps, _, _ in decoded])
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
    def _concat(name: str, decoded: list[tuple[np.ndarray, int, dict[str, np.ndarray]]], total: int) -> np.ndarray:
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
            spec.update({m["name"]: (m["dtype"], tuple(m["shape"][1:])) for m in header["cols"] if m["name"] != "step"})
        return {
            name: np.empty((0, *trail), dtype=np.dtype(dt))
            for name, (dt, trail) in spec.items()
            if wanted is None or name in wanted
        }

    # ------------------------------------------------------------------ events and validation

    def add_events(self, run_id: int, events: Iterable[Event]) -> None:
        """Store events (anything with ``step``, ``kind``, ``data`` and ``time``)."""
        run_id = _run_id(run_id)
        rows = [(run_id, int(e.step), str(e.kind), dumps(e.data or {}), float(e.time)) for e in events]
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
            rows = _read(
                conn, "SELECT step, kind, data, time FROM events WHERE run_id=? ORDER BY step, id", (run_id,)
            )
        return [Event(step=s, kind=k, data=loads(d, f"an event of run {run_id} in {self.path}"), time=t)
                for s, k, d, t in rows]

    def load_validation(self, run_id: int) -> list[ValPoint]:
        """The run's validation points in step order (a non-finite loss is read back as NaN)."""
        run_id = _run_id(run_id)
        with self._op("reading validation points") as conn:
            self._check_run(conn, run_id)
            rows = _read(
                conn, "SELECT step, epoch, loss, accuracy, time FROM validation WHERE run_id=? ORDER BY step, id",
                (run_id,),
            )
        return [
            ValPoint(step=s, epoch=e, loss=math.nan if loss is None else loss, accuracy=acc, time=t)
            for s, e, loss, acc, t in rows
        ]

    # ------------------------------------------------------------------ extra scalar series

    def add_scalars(
        self, run_id: int, name: str, steps: Iterable[int], values: Iterable[float],
        times: Iterable[float] | None = None,
    ) -> None:
        """Store points of the scalar series ``name`` (any name: ``val_accuracy``, a TensorBoard tag):
        ``values[i]`` logged at step ``steps[i]``, ``times[i]`` seconds after the run started (as the
        ``time`` of its steps, events and validation points; default: now).

        Sparse series (a point every N steps, a few at a time) are the common case: points that follow
        the series' last stored step are folded into its last chunk while it holds fewer than
        :data:`SCALAR_CHUNK` points, so one call per logged point stays compact. A dense series of a
        million points takes about 6 bytes a point."""
        run_id = _run_id(run_id)
        if not isinstance(name, str) or not name.strip():
            raise StoreError(f"a scalar series needs a name (a non-empty string), not {name!r}")
        cols = self._scalar_columns(name, steps, values, times)
        if not len(cols["step"]):
            return
        with self._write("storing scalars") as conn:
            row = _read(conn, "SELECT COALESCE(started_at, created_at) AS created_at FROM runs WHERE id=?",
                        (run_id,), one=True)
            if row is None:
                raise self._unknown(run_id)
            if times is None:
                cols["time"][:] = time.time() - row[0]
            last = _read(
                conn, "SELECT id, last_step, n, header, data FROM scalars WHERE run_id=? AND name=? ORDER BY id DESC LIMIT 1",
                (run_id, name), one=True,
            )
            into = None
            if (last is not None and last["n"] < SCALAR_CHUNK
                    and int(cols["step"].min()) >= last["last_step"]):  # extend the last chunk, in place
                old = unpack(last["header"], last["data"], self._scalars_what(run_id, name))
                cols = {k: np.concatenate((old[k], cols[k])) for k in cols}
                into = last["id"]
            for i in range(0, len(cols["step"]), SCALAR_CHUNK):
                self._put_scalars(conn, run_id, name, {k: v[i:i + SCALAR_CHUNK] for k, v in cols.items()}, into)
                into = None

    @staticmethod
    def _scalar_columns(name: str, steps: Any, values: Any, times: Any) -> dict[str, np.ndarray]:
        """The step (int64), value and time (float64) columns of scalar points, checked."""
        try:
            s = np.asarray(steps)
            v = np.asarray(values, dtype=np.float64)
            t = np.zeros(len(v)) if times is None else np.asarray(times, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"scalar series {name!r}: values and times must be numbers ({exc})") from None
        if s.ndim != 1 or v.ndim != 1 or t.ndim != 1 or not len(s) == len(v) == len(t):
            raise StoreError(f"scalar series {name!r}: steps, values and times must be 1-D and of one length "
                             f"(got {s.shape}, {v.shape}, {t.shape})")
        if s.dtype.kind == "f" and bool(np.all(s == np.round(s))):
            s = s.astype(np.int64)
        if len(s) and s.dtype.kind not in "iu":
            raise StoreError(f"scalar series {name!r}: steps must be whole numbers, not {s.dtype}")
        return {"step": s.astype(np.int64), "value": v, "time": t}

    @staticmethod
    def _put_scalars(
        conn: sqlite3.Connection, run_id: int, name: str, cols: dict[str, np.ndarray], row_id: int | None = None
    ) -> None:
        """Store a chunk of scalar points as a new row, or in place of row ``row_id``. Rows are read in
        id order, so points logged at one step come back in the order they were logged."""
        header, blob = pack(len(cols["step"]), cols)
        conn.execute(
            "INSERT OR REPLACE INTO scalars (id, run_id, name, first_step, last_step, n, header, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row_id, run_id, name, int(cols["step"].min()), int(cols["step"].max()), len(cols["step"]), header,
             blob),
        )

    def _scalars_what(self, run_id: int, name: str) -> str:
        return f"the scalar series {name!r} of run {run_id} in {self.path} is damaged"

    def _truncate_scalars(self, conn: sqlite3.Connection, run_id: int, k: int) -> None:
        """Forget the scalar points of a run from step ``k`` on."""
        rows = _read(
            conn, "SELECT id, name, first_step, header, data FROM scalars WHERE run_id=? AND last_step>=?", (run_id, k)
        )
        for row in rows:
            if row["first_step"] < k:
                cols = unpack(row["header"], row["data"], self._scalars_what(run_id, row["name"]))
                keep = cols["step"] < k
                self._put_scalars(conn, run_id, row["name"], {c: a[keep] for c, a in cols.items()}, row["id"])
            else:
                conn.execute("DELETE FROM scalars WHERE id=?", (row["id"],))

    def load_scalars(
        self, run_id: int, names: Iterable[str] | None = None, *, times: bool = False
    ) -> dict[str, tuple[np.ndarray, ...]]:
        """The run's scalar series by name (sorted): ``(steps, values)`` in step order (points logged at
        one step in the order stored), or ``(steps, values, times)`` with ``times``. ``names`` limits
        which are read; a name the run never logged is left out."""
        run_id = _run_id(run_id)
        sql = "SELECT name, header, data FROM scalars WHERE run_id=?"
        args: list[Any] = [run_id]
        if names is not None:
            wanted = sorted({str(n) for n in names})
            if not wanted:
                return {}
            sql += f" AND name IN ({', '.join('?' * len(wanted))})"
            args += wanted
        with self._op("reading scalars") as conn:
            self._check_run(conn, run_id)
            rows = _read(conn, sql + " ORDER BY name, id", args)
        parts: dict[str, list[dict[str, np.ndarray]]] = {}
        for row in rows:
            parts.setdefault(row["name"], []).append(
                unpack(row["header"], row["data"], self._scalars_what(run_id, row["name"])))
        out: dict[str, tuple[np.ndarray, ...]] = {}
        for name, chunks in parts.items():
            cols = {k: np.concatenate([c[k] for c in chunks]) for k in ("step", "value", "time")}
            if len(cols["step"]) > 1 and not bool(np.all(cols["step"][1:] >= cols["step"][:-1])):
                order = np.argsort(cols["step"], kind="stable")
                cols = {k: a[order] for k, a in cols.items()}
            out[name] = (cols["step"], cols["value"], cols["time"]) if times else (cols["step"], cols["value"])
        return out

    def scalar_names(self, run_id: int) -> list[str]:
        """The names of the run's scalar series, sorted."""
        run_id = _run_id(run_id)
        with self._op("reading scalar names") as conn:
            self._check_run(conn, run_id)
            return [r[0] for r in _read(
                conn, "SELECT DISTINCT name FROM scalars WHERE run_id=? ORDER BY name", (run_id,))]


def _read(conn: sqlite3.Connection, sql: str, args: Any = (), *, one: bool = False) -> Any:
    """The rows ``sql`` answers (with ``one``: the first, or None): every read of the store goes through
    here. SQLite never stores NULL in a NOT NULL column, so a row with one there (a damaged page decoded
    as a record of NULLs) means a damaged file: an sqlite3 error that :meth:`RunStore._op` turns into the
    damaged message, never a TypeError further on."""
    cur = conn.execute(sql, args)
    rows = cur.fetchmany(1) if one else cur.fetchall()
    match = _FROM.search(sql)
    required = _not_null().get(match.group(1).lower(), frozenset()) if match else frozenset()
    names = [d[0].lower() for d in cur.description or ()]
    checked = [i for i, name in enumerate(names) if name in required]
    for row in rows:
        for i in checked:
            if row[i] is None:
                raise sqlite3.DatabaseError(
                    f"database disk image is malformed (NULL in the NOT NULL column {names[i]} of {match.group(1)})")
    if one:
        return rows[0] if rows else None
    return rows


def _first(conn: sqlite3.Connection, sql: str, args: Any = ()) -> Any:
    """The first value of the one row ``sql`` answers. No row where SQLite always gives one (a pragma, a
    count, an aggregate) means a damaged file, raised as by :func:`_read`."""
    row = _read(conn, sql, args, one=True)
    if row is None:
        raise sqlite3.DatabaseError(f"database disk image is malformed ({sql!r} answered no row)")
    return row[0]


#: The table a query reads (every query of the store reads one).
_FROM = re.compile(r"\bFROM\s+(\w+)", re.IGNORECASE)


@functools.cache
def _not_null() -> dict[str, frozenset[str]]:
    """The columns of each table that can never be NULL: declared NOT NULL or the primary key in the
    schema (read from an empty store made in memory by the migrations), and ``chunks.stop_step``,
    which its trigger always fills."""
    conn = sqlite3.connect(":memory:")
    try:
        for step in MIGRATIONS:
            RunStore._apply(conn, step)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out = {t.lower(): frozenset(c[1].lower() for c in conn.execute(f"PRAGMA table_info({t})") if c[3] or c[5])
               for t in tables}
    finally:
        conn.close()
    out["chunks"] |= {"stop_step"}
    return out
