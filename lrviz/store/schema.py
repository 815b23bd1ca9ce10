"""The run store's schema: every version of it, as the migration steps that make it.

A new store runs every step; a store written by an older lrviz runs the steps it lacks when it is
opened (:class:`lrviz.store.runs.RunStore`), each in one transaction. To change the schema, add one
:class:`Migration` at the end of :data:`MIGRATIONS` (a nullable column or a new table is additive: an
older lrviz can still list and export the store read-only; a step that renames or retypes something
is marked ``breaks_readers=True``), and teach :mod:`lrviz.store.runs` to use what it adds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "statements"]


@dataclass(frozen=True)
class Migration:
    """One step of the schema, from version ``version - 1`` to ``version``, run in one transaction.

    ``apply`` is SQL (several statements) or a function of the connection. ``breaks_readers``: an lrviz
    that knows only older versions can no longer read a store migrated by this step (a renamed or
    retyped column); additive steps (a nullable column, a table) leave older versions able to list
    and export it read-only.
    """

    version: int
    what: str
    apply: str | Callable[[sqlite3.Connection], None]
    breaks_readers: bool = False


#: Every version of the schema, in order. A new store runs them all; an older one runs those it lacks.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, step chunks, events, validation points", """
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
    """),
    Migration(2, "run endpoint and kind, chunks of steps not at every integer, extra scalar series", """
        ALTER TABLE runs ADD COLUMN endpoint TEXT;
        ALTER TABLE runs ADD COLUMN kind TEXT;
        ALTER TABLE chunks ADD COLUMN stop_step INTEGER;
        UPDATE chunks SET stop_step = start_step + n;
        -- an older lrviz still writing this store (it was running when a newer one upgraded it) leaves
        -- stop_step out: its chunks are every integer
        CREATE TRIGGER chunks_stop_step AFTER INSERT ON chunks WHEN NEW.stop_step IS NULL BEGIN
            UPDATE chunks SET stop_step = NEW.start_step + NEW.n WHERE rowid = NEW.rowid;
        END;
        CREATE TABLE scalars (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            first_step INTEGER NOT NULL,
            last_step INTEGER NOT NULL,
            n INTEGER NOT NULL,
            header TEXT NOT NULL,
            data BLOB NOT NULL
        );
        CREATE INDEX scalars_run ON scalars(run_id, name);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta (key, value) VALUES ('readable_from', '2');
    """),
)
#: The schema this code writes.
SCHEMA_VERSION = MIGRATIONS[-1].version


def statements(sql: str) -> Iterator[str]:
    """The complete SQL statements of ``sql``, one at a time (``;`` inside quotes is kept)."""
    pending = ""
    for part in sql.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                yield pending.strip()
            pending = ""
    pending = pending[:-1]  # the ";" added after the last part
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:80]}")
