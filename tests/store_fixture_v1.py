"""What ``tests/data/store-v1.sqlite`` holds: a run store written by lrviz's schema-1 store code.

The test of the store's migrations opens a copy of that file with today's code and compares what it
reads with :func:`runs` (the same data that went in). The file was made once, with the schema-1
``lrviz/store.py`` (git: the commit before the store became versioned), by::

    git show 9b7ccf0:lrviz/store.py > /tmp/store_v1.py
    .venv/bin/python tests/store_fixture_v1.py /tmp/store_v1.py tests/data/store-v1.sqlite

Everything in it is deterministic (times included), so the file can be made again bit for bit
equivalent in content.
"""

from __future__ import annotations

import importlib.util
import math
import sqlite3
import sys
from pathlib import Path

import numpy as np

from lrviz.records import Event, ValPoint

FIXTURE = Path(__file__).resolve().parent / "data" / "store-v1.sqlite"
T0 = 1_760_000_000.0  # the fixture's clock: created_at of run 1


def _steps(n: int, first: int, groups: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    loss = 2.0 + np.cumsum(rng.normal(0, 0.05, n))
    if n > 7:
        loss[7] = np.nan
    lr = np.full((n, groups), 0.1) * (1 + np.arange(groups))
    return {
        "epoch": ((first + np.arange(n)) // 50).astype(np.int32),
        "time": np.round(0.001 * (first + np.arange(n)) + rng.uniform(0, 1e-4, n), 9),
        "loss": loss,
        "grad_norm": np.abs(rng.normal(1.0, 0.2, n)).astype(np.float32),
        "lr": lr,
    }


def runs() -> list[dict]:
    """The runs of the fixture, in id order: the arguments they were created with, their steps (appended
    in ``chunk`` rows), events, validation points, final status and the fixed times written into the file."""
    return [
        {
            "create": {"script_path": "/home/ada/mnist.py", "script_hash": "a1b2", "device": "cpu",
                       "config": {"lr": 0.1, "optimizer": "sgd", "steps": 120, "seed": 3,
                                  "schedule": "StepLR:step_size=50,gamma=0.5"}},
            "steps": _steps(120, 0, 2, seed=1), "first": 0, "chunk": 40,
            "events": [Event(40, "checkpoint", {"path": "/home/ada/.lrviz/checkpoints/1/step_40.pt"}, T0 + 2),
                       Event(50, "set_lr", {"lr": 0.05}, T0 + 2.5),
                       Event(60, "pause", {}, T0 + 3),
                       Event(80, "checkpoint", {"path": "/home/ada/.lrviz/checkpoints/1/step_80.pt"}, T0 + 4)],
            "validation": [ValPoint(39, 0, 1.9, 0.5, T0 + 2.1), ValPoint(79, 1, 1.7, None, T0 + 4.1),
                           ValPoint(119, 2, math.nan, 0.75, T0 + 6.1)],
            "status": "finished", "summary": {"best_loss": 1.5, "note": math.nan, "verdict": "fine"},
            "error": None, "times": (T0, T0 + 1, T0 + 7, T0 + 7),
        },
        {
            "create": {"script_path": "/home/ada/mnist.py", "script_hash": "a1b2", "device": "cpu",
                       "config": {"lr": 0.01, "optimizer": "sgd", "steps": 120}, "name": "fork at 80",
                       "parent_id": 1, "fork_step": 80},
            "steps": _steps(20, 80, 2, seed=2), "first": 80, "chunk": 20,
            "events": [Event(80, "set_schedule", {"spec": "ExponentialLR:gamma=0.99"}, T0 + 11)],
            "validation": [],
            "status": "stopped", "summary": {}, "error": None, "times": (T0 + 10, T0 + 10.5, T0 + 12, T0 + 12),
        },
        {
            "create": {"script_path": "/home/ada/broken.py", "script_hash": "ffff", "device": "cuda:0",
                       "config": {}},
            "steps": None, "first": 0, "chunk": 0, "events": [], "validation": [],
            "status": "failed", "summary": {}, "error": "ScriptError: broken.py:3: NameError: name 'x' is not defined",
            "times": (T0 + 20, T0 + 20.5, T0 + 21, T0 + 21),
        },
        {
            # left 'running' by a process long gone: the next open marks it 'interrupted'
            "create": {"script_path": "/home/ada/mnist.py", "script_hash": "a1b2", "device": "cpu",
                       "config": {"lr": 0.1}, "name": "crashed"},
            "steps": _steps(10, 0, 1, seed=4), "first": 0, "chunk": 10, "events": [], "validation": [],
            "status": "running", "summary": {}, "error": None, "times": (T0 + 30, T0 + 30.5, None, T0 + 31),
        },
    ]


def make(store_module: str, out: Path) -> None:
    """Write the fixture at ``out`` with the store code in the file ``store_module``."""
    spec = importlib.util.spec_from_file_location("store_v1", store_module)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["store_v1"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    assert mod.SCHEMA_VERSION == 1, "make the fixture with the schema-1 store code"
    out.unlink(missing_ok=True)
    store = mod.RunStore(out)
    for run in runs():
        run_id = store.create_run(**run["create"])
        if run["steps"] is not None:
            n = len(run["steps"]["loss"])
            for i in range(0, n, run["chunk"]):
                store.append_steps(run_id, run["first"] + i, {k: v[i:i + run["chunk"]] for k, v in run["steps"].items()})
        store.add_events(run_id, run["events"])
        store.add_validation(run_id, run["validation"])
        store.set_status(run_id, "running")
        store.set_status(run_id, run["status"], error=run["error"], summary=run["summary"] or None)
    store.close()
    conn = sqlite3.connect(out)
    for run_id, run in enumerate(runs(), start=1):
        created, started, ended, beat = run["times"]
        conn.execute("UPDATE runs SET created_at=?, started_at=?, ended_at=?, heartbeat_at=?, pid=? WHERE id=?",
                     (created, started, ended, beat, 10_000 + run_id, run_id))
    conn.commit()
    # small pages: the file is a few KB, not 4 KB per table and index
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA page_size=512")
    conn.execute("VACUUM")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


if __name__ == "__main__":
    make(sys.argv[1], Path(sys.argv[2]))
