"""Extra scalar series in the run store (any named value logged at some steps), and step chunks whose
steps are not every integer (an imported TensorBoard log's)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from lrviz.errors import StoreError
from lrviz.store.runs import SCALAR_CHUNK, Event, RunStore, ValPoint


@pytest.fixture
def store(tmp_path: Path):
    with RunStore(tmp_path / "runs.sqlite") as s:
        yield s


def new_run(store: RunStore) -> int:
    return store.create_run(script_path="/x/t.py", script_hash="h", config={}, device="cpu")


def rows_of(store: RunStore, table: str, run_id: int) -> int:
    with sqlite3.connect(store.path) as c:
        return c.execute(f"SELECT count(*) FROM {table} WHERE run_id=?", (run_id,)).fetchone()[0]


# --------------------------------------------------------------------------- scalar series


def test_a_sparse_series_logged_point_by_point_reads_back_and_stays_compact(store: RunStore):
    run = new_run(store)
    rng = np.random.default_rng(0)
    steps = np.arange(0, 50_000, 50)  # every 50 steps, as a validation metric
    values = rng.uniform(size=len(steps))
    times = steps * 1e-3  # seconds since the run started
    for s, v, t in zip(steps, values, times):
        store.add_scalars(run, "val_accuracy", [s], [v], [t])
    store.add_scalars(run, "grad/layer1", steps[:3], values[:3], times[:3])
    assert store.scalar_names(run) == ["grad/layer1", "val_accuracy"]
    got_steps, got_values, got_times = store.load_scalars(run, times=True)["val_accuracy"]
    assert got_steps.dtype == np.int64 and got_steps.tolist() == steps.tolist()
    assert got_values.tolist() == values.tolist() and got_times.tolist() == times.tolist()
    assert rows_of(store, "scalars", run) == 2  # folded into one chunk per name, not a row per point
    assert list(store.load_scalars(run, ["grad/layer1", "never logged"])) == ["grad/layer1"]
    assert store.load_scalars(run, []) == {}


def test_points_logged_out_of_order_or_twice_at_a_step_are_read_in_step_order(store: RunStore):
    run = new_run(store)
    store.add_scalars(run, "lr", [10, 20], [1.0, 2.0], [0, 0])
    store.add_scalars(run, "lr", [5, 20], [0.5, 2.5], [0, 0])
    steps, values = store.load_scalars(run)["lr"]
    assert steps.tolist() == [5, 10, 20, 20] and values.tolist() == [0.5, 1.0, 2.0, 2.5]


def test_a_dense_series_of_a_million_points(store: RunStore, record_property):
    run = new_run(store)
    n = 1_000_000
    steps = np.arange(n)
    values = np.cumsum(np.random.default_rng(1).normal(0, 0.01, n)) + 2.0
    times = steps / 3000.0
    t0 = time.perf_counter()
    store.add_scalars(run, "loss/ema", steps, values, times)
    t1 = time.perf_counter()
    got = store.load_scalars(run, times=True)["loss/ema"]
    t2 = time.perf_counter()
    assert got[0].tolist() == steps.tolist() and got[1].tobytes() == values.tobytes()
    assert got[2].tobytes() == times.tobytes()
    assert rows_of(store, "scalars", run) == -(-n // SCALAR_CHUNK)
    with sqlite3.connect(store.path) as c:
        stored = c.execute("SELECT sum(length(data) + length(header)) FROM scalars").fetchone()[0]
    record_property("scalar_bytes_per_point", stored / n)
    record_property("scalar_write_s", t1 - t0)
    record_property("scalar_read_s", t2 - t1)
    assert stored / n < 12, stored / n  # float64 value and time, int64 step: 24 bytes raw


def test_scalars_bad_input_is_one_message_and_stores_nothing(store: RunStore):
    run = new_run(store)
    for args, match in [
        (("", [1], [1.0]), "needs a name"),
        ((None, [1], [1.0]), "needs a name"),
        (("a", [1, 2], [1.0]), "of one length"),
        (("a", [1], ["high"]), "must be numbers"),
        (("a", [1.5], [1.0]), "whole numbers"),
        (("a", [[1]], [[1.0]]), "1-D"),
    ]:
        with pytest.raises(StoreError, match=match):
            store.add_scalars(run, *args)
    with pytest.raises(StoreError, match="no run '99'"):
        store.add_scalars(99, "a", [1], [1.0])
    with pytest.raises(StoreError, match="no run '99'"):
        store.load_scalars(99)
    assert store.scalar_names(run) == []
    store.add_scalars(run, "a", [], [])  # nothing to store
    before = time.time()
    store.add_scalars(run, "a", np.array([3.0]), [1.0])  # whole-number floats are steps; time: now
    steps, _, times = store.load_scalars(run, times=True)["a"]
    started = store.get_run(run).created_at  # not started: seconds since it was created
    assert steps.tolist() == [3] and before - started <= times[0] <= time.time() - started


def test_truncate_and_delete_take_the_scalars_along(store: RunStore):
    run = new_run(store)
    store.append_steps(run, 0, {"loss": np.ones(100)})
    store.add_scalars(run, "val", np.arange(0, 100, 10), np.arange(10.0), np.zeros(10))
    store.add_scalars(run, "late", [80, 90], [1.0, 2.0], [0, 0])
    store.truncate_run(run, 45)
    assert set(store.load_scalars(run)) == {"val"}  # "late" was all after step 45
    steps, values = store.load_scalars(run)["val"]
    assert steps.tolist() == [0, 10, 20, 30, 40] and values.tolist() == [0, 1, 2, 3, 4]
    store.delete_run(run)
    assert rows_of(store, "scalars", run) == 0


# --------------------------------------------------------------------------- steps not at every integer


def test_steps_not_at_every_integer_read_back_as_stored(store: RunStore):
    run = new_run(store)
    steps = np.array([0, 10, 20, 35, 50, 70, 100, 101, 102, 150])
    loss = np.linspace(3, 1, len(steps))
    store.append_steps(run, 0, {"step": steps[:4], "loss": loss[:4]})
    store.append_steps(run, 50, {"step": steps[4:], "loss": loss[4:], "lr": np.full((6, 2), 0.1)})
    info = store.get_run(run)
    assert info.steps == len(steps) and info.best_loss == 1.0 and info.final_loss == 1.0
    out = store.load_steps(run)
    assert out["step"].tolist() == steps.tolist() and out["loss"].tolist() == loss.tolist()
    assert np.isnan(out["lr"][:4]).all() and (out["lr"][4:] == 0.1).all()
    for start, stop in [(0, 1), (5, 36), (36, 50), (21, 101), (101, None), (151, None)]:
        part = store.load_steps(run, start, stop)
        keep = (steps >= start) & (steps < (stop if stop is not None else 10**9))
        assert part["step"].tolist() == steps[keep].tolist(), (start, stop)
        assert part["loss"].tolist() == loss[keep].tolist(), (start, stop)
    with pytest.raises(StoreError, match="overlap stored steps 0..35"):
        store.append_steps(run, 30, {"loss": np.ones(2)})
    with pytest.raises(StoreError, match="'step' column must be whole numbers that start at 200 and increase"):
        store.append_steps(run, 200, {"step": [200, 200], "loss": np.ones(2)})

    store.truncate_run(run, 60)  # inside the second chunk: its steps 50 and below 60 stay
    assert store.load_steps(run)["step"].tolist() == [0, 10, 20, 35, 50]
    assert store.get_run(run).steps == 5


def test_contiguous_steps_store_no_step_column(store: RunStore):
    """A step column that is every integer costs nothing: it is not stored (the engine's chunks)."""
    run = new_run(store)
    store.append_steps(run, 7, {"step": np.arange(7, 107), "loss": np.ones(100)})
    with sqlite3.connect(store.path) as c:
        header = c.execute("SELECT header FROM chunks WHERE run_id=?", (run,)).fetchone()[0]
    assert '"step"' not in header
    assert store.load_steps(run)["step"].tolist() == list(range(7, 107))


def test_events_and_validation_are_untouched_by_scalars(store: RunStore):
    run = new_run(store)
    store.add_events(run, [Event(3, "set_lr", {"lr": 0.1}, 1.0)])
    store.add_validation(run, [ValPoint(3, 0, 0.5, None, 1.0)])
    store.add_scalars(run, "val_loss", [3], [0.7], [1.0])
    assert [e.kind for e in store.load_events(run)] == ["set_lr"]
    assert [p.loss for p in store.load_validation(run)] == [0.5]
