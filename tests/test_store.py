"""Tests of the run store (lrviz.store.runs): chunked step series, runs, events, files and concurrency."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from folders import needs_permissions, read_only_folder
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from store_events import wait_until

from lrviz.errors import StoreError
from lrviz.store.codec import decode_column, encode_column
from lrviz.store.runs import (
    RUN_STATUSES,
    Event,
    RunInfo,
    RunStore,
    ValPoint,
)

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path):
    with RunStore(tmp_path / "runs.sqlite") as s:
        yield s


def new_run(store: RunStore, **kw) -> int:
    args = {"script_path": "/x/mnist.py", "script_hash": "abc", "config": {"lr": 0.1}, "device": "cpu"}
    args.update(kw)
    return store.create_run(**args)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and signed zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def realistic_steps(n: int, groups: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Columns as the engine writes them: random-walk loss (float32 values), ~2000 steps/s."""
    rng = np.random.default_rng(seed)
    loss = np.abs(2.5 + np.cumsum(rng.normal(0, 0.01, n))).astype(np.float32).astype(np.float64) + 0.01
    lr = np.full((n, groups), 1e-3)
    lr[n // 2 :] = 3e-4
    return {
        "epoch": (np.arange(n) // 5000).astype(np.int32),
        "time": np.cumsum(rng.exponential(1 / 2000, n)),
        "loss": loss,
        "grad_norm": np.abs(rng.normal(1.0, 0.3, n)).astype(np.float32),
        "lr": lr,
    }


def append_in_chunks(store: RunStore, run_id: int, cols: dict[str, np.ndarray], chunk: int, first: int = 0):
    n = len(next(iter(cols.values())))
    for i in range(0, n, chunk):
        store.append_steps(run_id, first + i, {k: v[i : i + chunk] for k, v in cols.items()})


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


# --------------------------------------------------------------------------- step series


def test_chunks_round_trip_exact(store: RunStore):
    run = new_run(store)
    rng = np.random.default_rng(1)
    n = 2500
    cols = realistic_steps(n, groups=3)
    cols["loss"][[5, 700, 1800]] = [np.nan, np.inf, -0.0]
    cols["flags"] = rng.integers(0, 2, n).astype(bool)
    cols["half"] = rng.normal(size=n).astype(np.float16)
    cols["big"] = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
    cols["u8"] = rng.integers(0, 255, (n, 4), dtype=np.uint8)
    cols["cplx"] = (rng.normal(size=n) + 1j * rng.normal(size=n)).astype(np.complex128)
    append_in_chunks(store, run, cols, chunk=700)  # 4 chunks, the last one partial

    out = store.load_steps(run)
    assert set(out) == set(cols) | {"step"}
    assert same_bits(out["step"], np.arange(n, dtype=np.int64))
    for name, a in cols.items():
        assert same_bits(out[name], a), name
    assert out["lr"].shape == (n, 3)
    assert store.get_run(run).steps == n

    for start, stop in [(0, 1), (650, 760), (699, 701), (1400, 2100), (2000, None), (2499, 9999), (10, 10)]:
        part = store.load_steps(run, start, stop)
        hi = n if stop is None else min(stop, n)
        assert same_bits(part["step"], np.arange(start, hi, dtype=np.int64)), (start, stop)
        for name, a in cols.items():
            assert same_bits(part[name], a[start:hi]), (name, start, stop)

    beyond = store.load_steps(run, 5000)
    assert beyond["lr"].shape == (0, 3) and beyond["grad_norm"].dtype == np.float32
    only = store.load_steps(run, 100, 200, columns=["loss"])
    assert list(only) == ["loss"] and same_bits(only["loss"], cols["loss"][100:200])


def test_steps_of_a_run_without_steps_are_empty_and_consistent(store: RunStore):
    run = new_run(store)
    out = store.load_steps(run)
    assert {"step", "epoch", "time", "loss", "grad_norm", "lr"} <= set(out)
    assert all(len(a) == 0 for a in out.values())
    assert out["step"].dtype == np.int64 and out["lr"].ndim == 2
    assert store.get_run(run).steps == 0


def test_steps_from_a_later_first_step_and_gaps(store: RunStore):
    run = new_run(store, fork_step=999)
    cols = realistic_steps(300)
    store.append_steps(run, 1000, {k: v[:100] for k, v in cols.items()})
    store.append_steps(run, 1200, {k: v[100:300] for k, v in cols.items()})  # a gap 1100..1199
    out = store.load_steps(run)
    assert same_bits(out["step"], np.r_[np.arange(1000, 1100), np.arange(1200, 1400)].astype(np.int64))
    assert same_bits(out["loss"], cols["loss"])
    part = store.load_steps(run, 1050, 1250)
    assert part["step"][0] == 1050 and part["step"][-1] == 1249 and len(part["step"]) == 100


def test_append_same_start_replaces_and_overlap_is_refused(store: RunStore):
    run = new_run(store)
    cols = realistic_steps(200)
    append_in_chunks(store, run, cols, chunk=100)
    store.append_steps(run, 100, {k: v[100:] for k, v in cols.items()})  # retry of the last flush
    info = store.get_run(run)
    assert info.steps == 200
    assert same_bits(store.load_steps(run)["loss"], cols["loss"])

    changed = {k: v[100:].copy() for k, v in cols.items()}
    changed["loss"][:] = 0.25
    store.append_steps(run, 100, changed)
    assert store.get_run(run).final_loss == 0.25 and store.get_run(run).best_loss == 0.25
    assert np.all(store.load_steps(run, 100)["loss"] == 0.25)

    with pytest.raises(StoreError, match="overlap"):
        store.append_steps(run, 150, {k: v[:10] for k, v in cols.items()})
    with pytest.raises(StoreError, match="overlap"):
        store.append_steps(run, 50, {k: v[:10] for k, v in cols.items()})
    assert store.get_run(run).steps == 200


def test_append_validates_its_input(store: RunStore):
    run = new_run(store)
    with pytest.raises(StoreError, match="differ in length"):
        store.append_steps(run, 0, {"loss": np.zeros(3), "time": np.zeros(4)})
    with pytest.raises(StoreError, match="'step' column"):
        store.append_steps(run, 0, {"loss": np.zeros(3), "step": np.arange(1, 4)})
    with pytest.raises(StoreError, match="numeric"):
        store.append_steps(run, 0, {"name": np.array(["a", "b"])})
    with pytest.raises(StoreError, match="no run '999'"):
        store.append_steps(999, 0, {"loss": np.zeros(3)})
    store.append_steps(run, 0, {"loss": np.zeros(3), "step": np.arange(3)})  # a matching step column is fine
    store.append_steps(run, 3, {"loss": np.zeros(0)})  # nothing to store
    assert store.get_run(run).steps == 3
    assert "step" in store.load_steps(run)


def test_column_missing_in_some_chunks_is_nan_filled(store: RunStore):
    run = new_run(store)
    store.append_steps(run, 0, {"loss": np.ones(3), "lr": np.full((3, 1), 0.1)})
    store.append_steps(run, 3, {"loss": np.ones(2), "lr": np.full((2, 2), 0.2), "acc": np.ones(2, np.int32)})
    out = store.load_steps(run)
    assert out["lr"].shape == (5, 2)
    assert np.array_equal(out["lr"], [[0.1, np.nan]] * 3 + [[0.2, 0.2]] * 2, equal_nan=True)
    assert out["acc"].dtype == np.float64
    assert np.array_equal(out["acc"], [np.nan, np.nan, np.nan, 1, 1], equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.one_of(
            hnp.integer_dtypes(endianness="?"),
            hnp.unsigned_integer_dtypes(endianness="?"),
            hnp.floating_dtypes(endianness="?"),
            hnp.boolean_dtypes(),
            hnp.complex_number_dtypes(endianness="?"),
        ),
        shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=40),
    )
)
def test_column_codec_is_bit_exact(a: np.ndarray):
    meta, payload = encode_column("c", a)
    back = decode_column(meta, payload)
    assert same_bits(back, np.ascontiguousarray(a))


# --------------------------------------------------------------------------- losses, events, validation


def test_best_and_final_loss_ignore_non_finite(store: RunStore):
    run = new_run(store)
    assert store.get_run(run).best_loss is None and store.get_run(run).final_loss is None
    store.append_steps(run, 0, {"loss": np.array([3.0, np.nan, 1.5, 2.0])})
    store.append_steps(run, 4, {"loss": np.array([np.inf, 0.5, 0.9, np.nan])})
    info = store.get_run(run)
    assert info.best_loss == 0.5 and info.final_loss == 0.9
    store.append_steps(run, 8, {"loss": np.array([np.nan, -np.inf])})  # nothing finite: figures kept
    info = store.get_run(run)
    assert info.best_loss == 0.5 and info.final_loss == 0.9 and info.steps == 10
    store.append_steps(run, 10, {"loss": np.array([0.7], np.float32)})
    assert store.get_run(run).final_loss == pytest.approx(0.7)

    other = new_run(store)
    store.append_steps(other, 0, {"loss": np.array([np.nan, np.nan])})
    assert store.get_run(other).best_loss is None and store.get_run(other).final_loss is None


def test_events_and_validation_round_trip(store: RunStore):
    run = new_run(store)
    events = [
        Event(step=10, kind="set_lr", data={"lr": np.float32(0.5), "groups": (0, 1)}, time=1.5),
        Event(step=3, kind="pause", data={}, time=0.25),
        Event(
            step=10, kind="diverged", data={"loss": float("nan"), "grad": np.inf, "a": np.arange(3)}, time=2.0
        ),
    ]
    store.add_events(run, events)
    store.add_events(run, [])
    back = store.load_events(run)
    assert [(e.step, e.kind, e.time) for e in back] == [
        (3, "pause", 0.25),
        (10, "set_lr", 1.5),
        (10, "diverged", 2.0),
    ]
    assert back[1].data == {"lr": 0.5, "groups": [0, 1]}
    assert back[2].data == {"loss": "nan", "grad": "inf", "a": [0, 1, 2]}

    points = [
        ValPoint(step=100, epoch=0, loss=0.75, accuracy=0.5, time=3.0),
        ValPoint(step=200, epoch=1, loss=float("nan"), accuracy=None, time=6.0),
    ]
    store.add_validation(run, points)
    got = store.load_validation(run)
    assert got[0] == points[0]
    assert got[1].step == 200 and got[1].epoch == 1 and math.isnan(got[1].loss) and got[1].accuracy is None

    with pytest.raises(StoreError, match="no run '42'"):
        store.load_events(42)


# --------------------------------------------------------------------------- runs


def test_create_list_get_rename(store: RunStore):
    a = new_run(store, config={"lr": np.float64(0.1), "wd": float("inf"), "path": Path("/d")})
    b = new_run(store, name="baseline", script_path="/y/cifar.py")  # the same created_at: newest id first
    info = store.get_run(a)
    assert isinstance(info, RunInfo)
    assert info.name == f"mnist #{a}" and info.status == "created" and info.pid == os.getpid()
    assert info.config == {"lr": 0.1, "wd": "inf", "path": "/d"}
    assert info.script_path == "/x/mnist.py" and info.script_hash == "abc" and info.device == "cpu"
    assert [r.id for r in store.list_runs()] == [b, a]

    assert store.get_run("baseline").id == b
    assert store.get_run(str(a)).id == a and store.get_run(f"#{a}").id == a
    with pytest.raises(StoreError, match=r"no run 'nope' in .*runs\.sqlite; `lrviz runs` lists them"):
        store.get_run("nope")
    with pytest.raises(StoreError, match="no run '77'"):
        store.get_run(77)

    store.rename_run(a, "baseline")
    with pytest.raises(StoreError, match="several runs are named 'baseline'"):
        store.get_run("baseline")
    store.rename_run(a, "  first try ")
    assert store.get_run("first try").id == a
    with pytest.raises(StoreError):
        store.rename_run(a, " ")
    with pytest.raises(StoreError, match="no run"):
        store.rename_run(1234, "x")

    child = new_run(store, parent_id=a, fork_step=50)
    assert store.get_run(child).parent_id == a and store.get_run(child).fork_step == 50
    with pytest.raises(StoreError, match="no run"):
        new_run(store, parent_id=999)


def test_status_times_summary_and_error(store: RunStore):
    run = new_run(store)
    store.set_status(run, "running")
    started = store.get_run(run).started_at
    assert started is not None and store.get_run(run).ended_at is None
    store.set_status(run, "paused")
    store.set_status(run, "running")
    assert store.get_run(run).started_at == started
    store.set_status(run, "diverged", error="loss became NaN", summary={"steps": np.int64(7), "x": np.nan})
    store.set_status(run, "diverged", summary={"more": 1})
    info = store.get_run(run)
    assert info.status == "diverged" and info.ended_at is not None and info.ended_at >= started
    assert info.error == "loss became NaN"
    assert info.summary == {"steps": 7, "x": "nan", "more": 1}
    with pytest.raises(StoreError, match="unknown run status"):
        store.set_status(run, "exploded")
    with pytest.raises(StoreError, match="no run"):
        store.set_status(555, "running")
    assert set(RUN_STATUSES) >= {"created", "interrupted"}


def test_delete_run_removes_rows_and_checkpoints(store: RunStore, tmp_path: Path):
    run = new_run(store)
    keep = new_run(store)
    child = new_run(store, parent_id=run, fork_step=1)
    append_in_chunks(store, run, realistic_steps(50), chunk=20)
    append_in_chunks(store, keep, realistic_steps(50), chunk=20)
    store.add_events(run, [Event(1, "checkpoint", {"file": "a.pt"}, 0.0)])
    store.add_validation(run, [ValPoint(1, 0, 0.5, None, 0.0)])
    folder = store.checkpoint_dir(run)
    assert folder == tmp_path / "checkpoints" / str(run) and folder.is_dir()
    (folder / "a.pt").write_bytes(b"weights")

    store.delete_run(run)
    assert not folder.exists()
    assert [r.id for r in store.list_runs()] == [child, keep]
    assert store.get_run(child).parent_id is None
    with pytest.raises(StoreError, match="no run"):
        store.load_steps(run)
    with pytest.raises(StoreError, match="no run"):
        store.delete_run(run)
    with pytest.raises(StoreError, match="no run"):
        store.checkpoint_dir(run)
    conn = sqlite3.connect(store.path)
    for table in ("chunks", "events", "validation"):
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE run_id=?", (run,)).fetchone()[0] == 0
    conn.close()
    assert len(store.load_steps(keep)["loss"]) == 50
    assert store.integrity_ok()


def test_delete_gives_the_space_back(tmp_path: Path):
    with RunStore(tmp_path) as s:
        big, small = new_run(s), new_run(s)
        append_in_chunks(s, big, realistic_steps(40_000), chunk=1000)
        append_in_chunks(s, small, realistic_steps(1000), chunk=1000)
    full = (tmp_path / "runs.sqlite").stat().st_size
    with RunStore(tmp_path) as s:
        s.delete_run(big)
    assert (tmp_path / "runs.sqlite").stat().st_size < full / 4
    with RunStore(tmp_path) as s:
        assert s.integrity_ok() and len(s.load_steps(small)["loss"]) == 1000


def test_batch_is_one_transaction(store: RunStore):
    run = new_run(store)
    with pytest.raises(RuntimeError):
        with store.batch():
            store.append_steps(run, 0, {"loss": np.ones(5)})
            store.add_events(run, [Event(0, "pause", {}, 0.0)])
            raise RuntimeError("writer crashed")
    assert store.get_run(run).steps == 0 and store.load_events(run) == []

    with store.batch():
        store.append_steps(run, 0, {"loss": np.ones(5)})
        with pytest.raises(StoreError):
            with store.batch():  # nested: only the inner part is undone
                store.add_events(run, [Event(0, "pause", {}, 0.0)])
                store.append_steps(run, 2, {"loss": np.ones(5)})  # overlap
        store.heartbeat(run)
    assert store.get_run(run).steps == 5 and store.load_events(run) == []


# --------------------------------------------------------------------------- files and paths


def test_default_path_honours_lrviz_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LRVIZ_HOME", str(tmp_path / "home"))
    assert RunStore.default_path() == tmp_path / "home" / "runs.sqlite"
    with RunStore() as s:
        assert s.path == tmp_path / "home" / "runs.sqlite" and s.root == tmp_path / "home"
        new_run(s)
    assert (tmp_path / "home" / "runs.sqlite").is_file()

    monkeypatch.delenv("LRVIZ_HOME")
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_data_dir", lambda app: str(tmp_path / "data" / app))
    assert RunStore.default_path() == tmp_path / "data" / "lrviz" / "runs.sqlite"


def test_directory_and_file_paths(tmp_path: Path):
    with RunStore(tmp_path) as s:
        assert s.path == tmp_path / "runs.sqlite"
        run = new_run(s)
    with RunStore(str(tmp_path / "runs.sqlite")) as s:
        assert s.get_run(run).id == run
    with RunStore(tmp_path / "new" / "folder") as s:  # a missing folder is created
        assert s.path == tmp_path / "new" / "folder" / "runs.sqlite"
    with RunStore(tmp_path / "elsewhere" / "mine.sqlite") as s:
        assert s.path.name == "mine.sqlite" and s.root == tmp_path / "elsewhere"
        assert s.checkpoint_dir(new_run(s)) == tmp_path / "elsewhere" / "checkpoints" / "1"


def test_relative_paths_are_made_absolute_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A relative --store (or LRVIZ_HOME) must not record checkpoint paths that depend on the folder a
    later command runs in, or that a script's os.chdir moves."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LRVIZ_HOME", "home")
    for ref, want in (("runs", tmp_path / "runs" / "runs.sqlite"), ("sub/../mine.sqlite", tmp_path / "mine.sqlite"),
                      (None, tmp_path / "home" / "runs.sqlite")):
        assert RunStore.resolve_path(ref) == want
        with RunStore(ref) as s:
            assert s.path == want and s.root == want.parent
            folder = s.checkpoint_dir(new_run(s))
        assert folder.is_absolute() and folder.parent == want.parent / "checkpoints"


def test_unwritable_path_gives_store_error(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="cannot create the folder of the run store .*LRVIZ_HOME"):
        RunStore(blocker / "sub" / "runs.sqlite")


@needs_permissions
def test_read_only_folder_gives_store_error(tmp_path: Path):
    with read_only_folder(tmp_path) as folder, pytest.raises(StoreError, match="cannot write the run store|unable to open"):
        RunStore(folder)


def test_corrupt_file_gives_store_error(tmp_path: Path):
    bad = tmp_path / "runs.sqlite"
    garbage = os.urandom(4096) + b"this is not sqlite" * 100
    bad.write_bytes(garbage)
    with pytest.raises(StoreError, match=r"damaged or not an lrviz run store.*move the file aside"):
        RunStore(tmp_path)
    assert bad.read_bytes() == garbage  # left untouched

    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not an lrviz run store"):
        RunStore(other)



def test_closed_store_raises(tmp_path: Path):
    s = RunStore(tmp_path)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list_runs()


# --------------------------------------------------------------------------- liveness


def test_running_run_of_a_dead_process_is_interrupted_on_reopen(tmp_path: Path):
    code = """
        import os, sys
        from lrviz.store.runs import RunStore
        s = RunStore(sys.argv[1])
        run = s.create_run(script_path="t.py", script_hash="h", config={}, device="cpu")
        s.set_status(run, "running")
        print(run, os.getpid(), flush=True)
        os._exit(0)  # killed: no close, no final status
    """
    proc = run_python(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    run, pid = map(int, proc.stdout.split())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    with RunStore(tmp_path) as s:
        mine = new_run(s)
        s.set_status(mine, "running")  # alive and fresh: stays running
        info = s.get_run(run)
        assert info.status == "interrupted" and info.ended_at is not None and info.pid == pid
    with RunStore(tmp_path) as s:
        assert s.get_run(mine).status == "running"


def test_run_with_stale_heartbeat_is_interrupted(tmp_path: Path):
    with RunStore(tmp_path) as s:
        run = new_run(s)
        s.set_status(run, "paused")
        s.heartbeat(run)
    conn = sqlite3.connect(tmp_path / "runs.sqlite")
    conn.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (time.time() - 120, run))
    conn.commit()
    conn.close()
    with RunStore(tmp_path) as s:
        assert s.get_run(run).status == "interrupted"
        assert s.mark_interrupted() == []


# --------------------------------------------------------------------------- size and concurrency


def training_steps_per_s(steps: int = 200) -> float:
    """Steps a second of a small bare training loop (the README's 10-64-64-1 MLP at batch 32) here, now."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 10), torch.randn(32, 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
    return steps / (time.perf_counter() - t0)


def test_bytes_per_step_of_a_realistic_run(tmp_path: Path, record_property):
    """About 13 bytes a step, and the store keeps up with training many times over: appending (in
    the writer's 0.5 s chunks) is at least 20x faster than a small model trains, measured interleaved
    on this machine (a busy machine slows both)."""
    n, flush = 100_000, 1000  # 0.5 s flushes at 2000 steps/s
    cols = realistic_steps(n)
    append_s = 0.0
    train_rates = []
    with RunStore(tmp_path) as s:
        run = new_run(s)
        for i in range(0, n, flush):
            if i % (n // 4) == 0:
                train_rates.append(training_steps_per_s())
            t0 = time.perf_counter()
            with s.batch():
                s.append_steps(run, i, {k: v[i : i + flush] for k, v in cols.items()})
                s.heartbeat(run)
            append_s += time.perf_counter() - t0
        out = s.load_steps(run)
    for name, a in cols.items():
        assert same_bits(out[name], a)
    rate = n / append_s
    train = float(np.median(train_rates))
    per_step = (tmp_path / "runs.sqlite").stat().st_size / n
    record_property("bytes_per_step", round(per_step, 2))
    record_property("append_steps_per_s", round(rate))
    log.info("store: %.2f bytes/step, %.0f steps/s appended, %.0f steps/s trained", per_step, rate, train)
    assert per_step <= 32, f"{per_step:.1f} bytes per step"
    assert rate >= 20 * train, f"append throughput {rate:.0f} steps/s, training {train:.0f} steps/s"


def test_second_connection_and_subprocess_read_while_writing(tmp_path: Path):
    writer = RunStore(tmp_path)
    run = new_run(writer)
    cols = realistic_steps(3000)
    writer.append_steps(run, 0, {k: v[:1000] for k, v in cols.items()})
    reader = RunStore(tmp_path)
    code = """
        import sys
        from lrviz.store.runs import RunStore
        with RunStore(sys.argv[1]) as s:
            info = s.get_run(int(sys.argv[2]))
            steps = s.load_steps(info.id)
            print(info.steps, len(steps["loss"]))
    """
    # A flush in progress: readers see the last committed state, unblocked (a blocked reader would wait
    # for the lock until this transaction ends, which it does only after the reader has answered).
    with writer.batch():
        writer.append_steps(run, 1000, {k: v[1000:2000] for k, v in cols.items()})
        writer.heartbeat(run)
        assert reader.get_run(run).steps == 1000
        assert len(reader.load_steps(run)["loss"]) == 1000
        proc = run_python(code, str(tmp_path), str(run))
        assert proc.returncode == 0, proc.stderr
        assert [int(x) for x in proc.stdout.split()] == [1000, 1000]
    assert reader.get_run(run).steps == 2000
    assert same_bits(reader.load_steps(run)["loss"], cols["loss"][:2000])

    # Another process writes a run of its own while this one writes too.
    code = """
        import sys
        import numpy as np
        from lrviz.store.runs import RunStore
        with RunStore(sys.argv[1]) as s:
            run = s.create_run(script_path="other.py", script_hash="h", config={}, device="cpu")
            for i in range(0, 20000, 500):
                with s.batch():
                    s.append_steps(run, i, {"loss": np.full(500, 1.0)})
                    s.heartbeat(run)
            print(run)
    """
    env = dict(os.environ, PYTHONPATH=str(REPO))
    other = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    for i in range(2000, 3000, 50):
        with writer.batch():
            writer.append_steps(run, i, {k: v[i : i + 50] for k, v in cols.items()})
            writer.heartbeat(run)
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0
    assert reader.get_run(int(out)).steps == 20000
    assert same_bits(reader.load_steps(run)["time"], cols["time"])
    assert reader.integrity_ok()
    reader.close()
    writer.close()


def test_concurrent_writer_and_readers(tmp_path: Path):
    store = RunStore(tmp_path)
    other = RunStore(tmp_path)  # e.g. the run browser's own connection
    run = new_run(store)
    store.set_status(run, "running")
    errors: list[BaseException] = []
    stop = threading.Event()
    written = [0]
    seen: list[int] = []

    def write() -> None:
        try:
            rng = np.random.default_rng(0)
            step = 0
            while not stop.is_set():
                n = int(rng.integers(1, 400))
                with store.batch():
                    store.append_steps(run, step, realistic_steps(n, seed=step))
                    store.add_events(run, [Event(step, "set_lr", {"lr": 0.1}, 0.0)])
                    store.add_validation(run, [ValPoint(step, 0, 1.0, None, 0.0)])
                    store.heartbeat(run)
                step += n
                written[0] = step
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def read(s: RunStore) -> None:
        try:
            last = 0
            while not stop.is_set():
                info = s.get_run(run)
                data = s.load_steps(run, max(0, last - 100))
                assert info.steps >= last  # never goes back
                if info.steps:  # read after the run: holds at least its steps, without holes
                    assert data["step"][-1] >= info.steps - 1
                    assert np.all(np.diff(data["step"]) == 1)
                s.load_events(run)
                last = info.steps
                s.list_runs()
                seen.append(last)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [
        threading.Thread(target=write),
        threading.Thread(target=read, args=(store,)),
        threading.Thread(target=read, args=(other,)),
    ]
    for t in threads:
        t.start()
    # until the writer has committed many chunks and both readers have read many times over
    wait_until("enough concurrent reads and writes", lambda: errors or (written[0] >= 20_000 and len(seen) >= 100),
               lambda: all(t.is_alive() for t in threads))
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not errors, errors
    assert written[0] > 0 and seen and max(seen) > 0
    full = other.load_steps(run)
    assert len(full["step"]) == written[0] == other.get_run(run).steps
    assert np.array_equal(full["step"], np.arange(written[0]))
    assert len(other.load_events(run)) == len(other.load_validation(run))
    assert store.integrity_ok()
    other.close()
    store.close()


def test_truncate_run_keeps_only_what_came_before(tmp_path):
    """Resuming from a checkpoint at step k first forgets steps >= k (a chunk straddling k is cut)."""
    from lrviz.records import Event, ValPoint

    with RunStore(tmp_path) as s:
        rid = s.create_run(script_path="x.py", script_hash="h", config={}, device="cpu")
        for start in (0, 100, 200):
            s.append_steps(rid, start, {"loss": np.arange(start, start + 100, dtype=np.float64) + 1.0,
                                        "lr": np.full((100, 1), 0.1)})
        s.add_events(rid, [Event(10, "set_lr", {"lr": 0.1}, 0.0), Event(150, "pause", {}, 1.0)])
        s.add_validation(rid, [ValPoint(99, 0, 1.0, None, 0.0), ValPoint(199, 1, 0.5, None, 1.0)])
        s.truncate_run(rid, 150)
        steps = s.load_steps(rid)
        assert list(steps["step"]) == list(range(150))
        assert steps["loss"][-1] == 150.0
        assert s.get_run(rid).steps == 150 and s.get_run(rid).final_loss == 150.0
        assert [e.step for e in s.load_events(rid)] == [10]
        assert [p.step for p in s.load_validation(rid)] == [99]
        s.append_steps(rid, 150, {"loss": np.zeros(5), "lr": np.full((5, 1), 0.1)})
        assert s.get_run(rid).steps == 155


def test_a_query_that_must_answer_a_row_and_answers_none_is_the_damaged_message(tmp_path):
    """A damaged runs page once made `lrviz runs` print "internal error: TypeError: 'NoneType' object is
    not subscriptable" (a pragma read with fetchone()[0] got no row): it is the damaged-store message."""
    from lrviz.store.runs import StoreError, _first

    with RunStore(tmp_path / "s.sqlite") as s:
        with pytest.raises(StoreError, match="damaged or not an lrviz run store") as err:
            with s._op("reading the schema version") as conn:
                _first(conn, "SELECT 1 WHERE 0")
    assert err.value.kind == "damaged" and "move the file aside" in str(err.value)
