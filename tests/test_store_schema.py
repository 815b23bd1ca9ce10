"""The run store's schema versions: a store written by an older lrviz opens upgraded (the committed
schema-1 fixture), each migration step is one transaction, a store written by a newer lrviz opens
read-only or is refused, and what schema 2 added (run kind, live endpoint)."""

from __future__ import annotations

import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import store_fixture_v1 as v1
from test_broken_inputs import _read_only_runner

import lrviz.store.runs
from lrviz.errors import ConfigError, StoreError
from lrviz.store.codec import jsonable
from lrviz.store.runs import MIGRATIONS, SCHEMA_VERSION, Migration, RunStore


def fixture_copy(folder: Path) -> Path:
    """A copy of the committed schema-1 store (the test never touches the original)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "runs.sqlite"
    shutil.copyfile(v1.FIXTURE, path)
    return path


def schema_of(path: Path) -> list[tuple]:
    """Every table and index of a database, with its SQL (white space folded)."""
    with sqlite3.connect(path) as c:
        rows = c.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
    return [(*row[:3], " ".join((row[3] or "").split())) for row in rows]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_the_fixture_is_schema_1_as_written():
    # immutable: reading leaves no -wal/-shm files beside the fixture in the source tree
    with sqlite3.connect(f"{v1.FIXTURE.as_uri()}?mode=ro&immutable=1", uri=True) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM runs").fetchone()[0] == len(v1.runs())
    assert v1.FIXTURE.stat().st_size < 32_000


def test_a_schema_1_store_opens_upgraded_and_reads_back_what_was_written(tmp_path: Path):
    path = fixture_copy(tmp_path / "old")
    with RunStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION and not store.read_only
        infos = {r.id: r for r in store.list_runs()}
        assert sorted(infos) == [1, 2, 3, 4]
        for run_id, want in enumerate(v1.runs(), start=1):
            info = store.get_run(run_id)
            assert info == infos[run_id]
            made = want["create"]
            assert info.name == made.get("name") or info.name == f"{Path(made['script_path']).stem} #{run_id}"
            assert (info.script_path, info.script_hash, info.device) == (
                made["script_path"], made["script_hash"], made["device"])
            assert info.config == jsonable(made["config"])
            assert (info.parent_id, info.fork_step) == (made.get("parent_id"), made.get("fork_step"))
            assert info.summary == jsonable(want["summary"]) and info.error == want["error"]
            created, started, ended, beat = want["times"]
            assert (info.created_at, info.started_at, info.heartbeat_at, info.pid) == (
                created, started, beat, 10_000 + run_id)
            assert info.kind == "lrviz" and info.endpoint is None and not info.read_only
            if want["status"] == "running":  # its process is long gone: interrupted at its last heartbeat
                assert info.status == "interrupted" and info.ended_at == beat
            else:
                assert info.status == want["status"] and info.ended_at == ended

            steps = store.load_steps(run_id)
            cols = want["steps"]
            if cols is None:
                assert info.steps == 0 and len(steps["step"]) == 0
            else:
                n = len(cols["loss"])
                assert info.steps == n
                assert same_bits(steps["step"], np.arange(want["first"], want["first"] + n, dtype=np.int64))
                for name, a in cols.items():
                    assert same_bits(steps[name], a), (run_id, name)
                finite = cols["loss"][np.isfinite(cols["loss"])]
                assert (info.best_loss, info.final_loss) == (finite.min(), finite[-1])
                middle = store.load_steps(run_id, want["first"] + 5, want["first"] + 15)
                assert same_bits(middle["loss"], cols["loss"][5:15])
            assert store.load_events(run_id) == [
                type(e)(e.step, e.kind, jsonable(e.data), e.time) for e in want["events"]]
            got = store.load_validation(run_id)
            assert len(got) == len(want["validation"])
            for g, w in zip(got, want["validation"]):
                assert (g.step, g.epoch, g.accuracy, g.time) == (w.step, w.epoch, w.accuracy, w.time)
                assert g.loss == w.loss or (math.isnan(g.loss) and math.isnan(w.loss))
            assert store.load_scalars(run_id) == {} and store.scalar_names(run_id) == []

        # the upgraded store takes what schema 2 added
        store.add_scalars(1, "val_accuracy", [39, 79], [0.5, 0.6], [1.0, 2.0])
        store.set_endpoint(1, {"transport": "unix", "address": "/tmp/s", "token": "secret"})
        new = store.create_run(script_path="t.py", script_hash="h", config={}, device="cpu")
        store.append_steps(new, 0, {"loss": np.ones(3)})
        assert store.integrity_ok()
    with RunStore(path) as store:
        assert store.load_scalars(1)["val_accuracy"][1].tolist() == [0.5, 0.6]
        assert store.get_run(1).endpoint == {"transport": "unix", "address": "/tmp/s", "port": None,
                                             "pid": None, "hostname": None}
    # an upgraded store has exactly the schema of a new one
    with RunStore(tmp_path / "new"):
        pass
    assert schema_of(path) == schema_of(tmp_path / "new" / "runs.sqlite")


def test_chunks_an_older_lrviz_writes_after_the_upgrade_are_read(tmp_path: Path):
    """A schema-1 lrviz that was running while a newer one upgraded the store keeps appending chunks the
    schema-1 way (no stop_step): they are read like any other."""
    path = fixture_copy(tmp_path / "old")
    with RunStore(path) as store:
        pass
    with sqlite3.connect(path) as c:  # what schema-1 append_steps inserts
        header, data = c.execute("SELECT header, data FROM chunks WHERE run_id=4").fetchone()
        c.execute("INSERT INTO chunks (run_id, start_step, n, loss_min, loss_last, header, data) "
                  "VALUES (4, 10, 10, 0.0, 0.0, ?, ?)", (header, data))
    with RunStore(path) as store:
        steps = store.load_steps(4, 5)
        assert steps["step"].tolist() == list(range(5, 20))
        assert same_bits(steps["loss"][5:], v1.runs()[3]["steps"]["loss"])


def test_an_older_store_that_cannot_be_written_is_read_through_an_upgraded_copy(tmp_path: Path):
    """A schema-1 store in a read-only folder: listed and exported (from a private upgraded copy); the file
    is left exactly as it was, with nothing beside it."""
    path = fixture_copy(tmp_path / "ro")
    before = path.read_bytes()
    run = _read_only_runner(tmp_path)
    path.chmod(0o444)
    path.parent.chmod(0o555)
    try:
        listed = run("runs", "--store", str(path))
        exported = run("export", "1", "--store", str(path), "--out", str(tmp_path / "exp"), "--format", "csv")
        refused = run("run", "regression", "--steps", "5", "--quiet", "--store", str(path))
    finally:
        path.parent.chmod(0o755)
        path.chmod(0o644)
    assert listed.status == 0 and listed.stderr == "", listed.stderr
    assert "mnist #1" in listed.stdout and "fork at 80" in listed.stdout and "crashed" in listed.stdout
    assert exported.status == 0, exported.stderr
    assert len((tmp_path / "exp" / "metrics.csv").read_text().splitlines()) == 1 + 120 + 0  # every step
    assert refused.status == 1 and "read-only" in refused.stderr and "older lrviz" in refused.stderr, refused.stderr
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["runs.sqlite"]


def test_each_migration_step_is_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A step that fails half-way leaves the store at the version before it, with nothing of the step;
    a step that adds a column is one entry, and runs read by name ignore the column they do not know."""
    with RunStore(tmp_path) as store:
        run = store.create_run(script_path="t.py", script_hash="h", config={"lr": 0.1}, device="cpu")
    db = tmp_path / "runs.sqlite"
    broken = Migration(SCHEMA_VERSION + 1, "broken", "CREATE TABLE half (x); INSERT INTO nothing VALUES (1);")
    monkeypatch.setattr(lrviz.store.runs, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(lrviz.store.runs, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    before = schema_of(db)
    with pytest.raises(StoreError, match="nothing"):
        RunStore(tmp_path)
    assert schema_of(db) == before
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    colour = Migration(SCHEMA_VERSION + 1, "a colour per run", "ALTER TABLE runs ADD COLUMN colour TEXT;")
    monkeypatch.setattr(lrviz.store.runs, "MIGRATIONS", (*MIGRATIONS, colour))
    with RunStore(tmp_path) as store:
        assert store.schema_version() == SCHEMA_VERSION + 1
        assert store.get_run(run).config == {"lr": 0.1}
        with sqlite3.connect(db) as c:
            assert "colour" in [r[1] for r in c.execute("PRAGMA table_info(runs)")]


def test_a_store_written_by_a_newer_lrviz_is_read_only_or_refused(tmp_path: Path):
    with RunStore(tmp_path) as store:
        run = store.create_run(script_path="t.py", script_hash="h", config={}, device="cpu")
        store.append_steps(run, 0, {"loss": np.arange(4.0)})
    db = tmp_path / "runs.sqlite"
    with sqlite3.connect(db) as c:  # a newer lrviz that only added things
        c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with RunStore(tmp_path) as store:
        assert store.read_only
        assert [r.id for r in store.list_runs()] == [run]
        assert store.load_steps(run)["loss"].tolist() == [0, 1, 2, 3]
        for write in (lambda: store.create_run(script_path="t.py", script_hash="h", config={}, device="cpu"),
                      lambda: store.add_scalars(run, "x", [0], [1.0]), store.require_writable):
            with pytest.raises(StoreError, match=f"newer lrviz, schema {SCHEMA_VERSION + 1}.*upgrade lrviz"):
                write()
    with sqlite3.connect(db) as c:  # ... and one whose schema this version cannot read
        c.execute("UPDATE meta SET value=? WHERE key='readable_from'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="written by a newer lrviz .*cannot read it.*upgrade lrviz"):
        RunStore(tmp_path)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_run_kind_and_endpoint(tmp_path: Path):
    with RunStore(tmp_path) as store:
        mine = store.create_run(script_path="t.py", script_hash="h", config={}, device="cpu")
        logged = store.create_run(script_path="/logs/a", script_hash="", config={}, device="", kind="imported")
        with pytest.raises(StoreError, match="unknown run kind 'tb'.*lrviz, tracked, imported"):
            store.create_run(script_path="t.py", script_hash="h", config={}, device="cpu", kind="tb")
        assert store.get_run(mine).kind == "lrviz" and store.get_run(logged).kind == "imported"
        store.get_run(mine).require_trainable("resumed")
        with pytest.raises(ConfigError, match=f"run {logged} .*imported from /logs/a.*cannot be forked"):
            store.get_run(logged).require_trainable("forked")

        class Info:  # what lrviz.live.connection.ConnectionInfo gives: to_dict(), with a token
            def to_dict(self):
                return {"transport": "tcp", "address": "127.0.0.1", "port": 7000, "token": "s3cret", "pid": 42,
                        "hostname": "box", "run_id": mine}

        store.set_endpoint(mine, Info())
        assert store.get_run(mine).endpoint == {"transport": "tcp", "address": "127.0.0.1", "port": 7000,
                                                "pid": 42, "hostname": "box"}
        with sqlite3.connect(tmp_path / "runs.sqlite") as c:
            assert "s3cret" not in c.execute("SELECT endpoint FROM runs WHERE id=?", (mine,)).fetchone()[0]
        store.set_endpoint(mine, None)
        assert store.get_run(mine).endpoint is None
        with pytest.raises(StoreError, match="no run '99'"):
            store.set_endpoint(99, None)
