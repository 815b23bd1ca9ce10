"""Waiting on what another process records in a run store: the tests of live processes wait on these
events (a run row turning 'running', the writer committing steps), never on fixed sleeps.

Every wait polls the database read-only and gives up only after ``HANG_GUARD_S``, which exists to end a
hung test with a message, not to bound how fast anything is.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

#: How long a wait may last before the test is declared hung (generous: the machine may be busy).
HANG_GUARD_S = 300.0


def _query(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of ``sql``, or [] while the database does not exist yet or is being created."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30) as c:
            return c.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # no schema yet
        return []


def wait_until(what: str, ready: Callable[[], object], alive: Callable[[], bool] = lambda: True) -> object:
    """Poll ``ready()`` until it returns something truthy (returned); fail when ``alive()`` turns False."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if not alive():
            raise AssertionError(f"the process ended before {what}")
        time.sleep(0.02)
    raise AssertionError(f"hung: no {what} after {HANG_GUARD_S:.0f} s")


def stored_steps(db: Path, run_id: int) -> int:
    """The number of steps of ``run_id`` committed to the store at ``db``."""
    rows = _query(db, "SELECT steps FROM runs WHERE id=?", (run_id,))
    return int(rows[0][0]) if rows else 0


def wait_for_running_steps(db: Path, alive: Callable[[], bool] = lambda: True) -> int:
    """Wait until a run of the store at ``db`` is 'running' with committed steps; its id."""
    rows = wait_until(
        f"running run with stored steps in {db}",
        lambda: _query(db, "SELECT id FROM runs WHERE status='running' AND steps > 0 ORDER BY id DESC"),
        alive,
    )
    return int(rows[0][0])  # type: ignore[index]


def wait_for_commits(db: Path, run_id: int, count: int, alive: Callable[[], bool] = lambda: True) -> list[int]:
    """Wait for ``count`` more commits of steps of ``run_id`` (flushes of its writer); the step counts
    seen after each."""
    seen = [stored_steps(db, run_id)]
    for _ in range(count):
        seen.append(wait_until(f"new steps of run {run_id} in {db}",
                               lambda: (n := stored_steps(db, run_id)) > seen[-1] and n, alive))  # type: ignore[arg-type]
    return seen[1:]
