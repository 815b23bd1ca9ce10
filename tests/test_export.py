"""Tests of lrviz.export: metrics.csv, run.json, atomic writes and whole-run export (no Qt needed)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from folders import needs_permissions, read_only_folder

from lrviz import export
from lrviz.errors import ConfigError, StoreError
from lrviz.export import atomic_write, export_run, parse_formats, write_metrics_csv, write_run_json
from lrviz.records import Event, StepBuffer, ValPoint
from lrviz.store.runs import RunStore

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def make_steps(n: int, groups: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    buf = StepBuffer(groups=groups)
    for i in range(n):
        lrs = [0.05 / (g + 1) for g in range(groups)]
        buf.append(i // 10, i * 0.013 + rng.random() * 1e-3, float(np.float32(2.0 / (i + 1) + rng.random())),
                   rng.random() * 3, lrs)
    return buf.view()


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- CSV


def test_csv_columns_and_exact_values(tmp_path: Path):
    steps = make_steps(50, groups=3)
    path = write_metrics_csv(tmp_path / "metrics.csv", steps, [])
    header, rows = read_csv(path)
    assert header == ["step", "epoch", "time", "lr", "loss", "grad_norm", "lr_1", "lr_2", "val_loss", "val_accuracy"]
    assert len(rows) == 50
    for i, row in enumerate(rows):
        assert int(row[0]) == steps["step"][i]
        assert int(row[1]) == steps["epoch"][i]
        assert float(row[2]) == steps["time"][i]
        assert float(row[4]) == steps["loss"][i]
        assert np.float32(row[5]) == steps["grad_norm"][i]
        for g, col in enumerate((3, 6, 7)):
            assert float(row[col]) == steps["lr"][i, g]
        assert row[8] == row[9] == ""
    assert rows[0][3] == "0.05"  # the shortest text, not 0.05000000000000000277


def test_csv_non_finite_values(tmp_path: Path):
    steps = make_steps(4)
    steps = {k: np.array(v) for k, v in steps.items()}
    steps["loss"][1:] = [math.nan, math.inf, -math.inf]
    header, rows = read_csv(write_metrics_csv(tmp_path / "m.csv", steps, [ValPoint(3, 0, math.nan, None, 1.0)]))
    assert [r[4] for r in rows] == [repr(float(steps["loss"][0])), "nan", "inf", "-inf"]
    assert rows[3][header.index("val_loss")] == "nan"
    assert rows[3][header.index("val_accuracy")] == ""


def test_csv_validation_rows(tmp_path: Path):
    steps = make_steps(30)
    vals = [
        ValPoint(9, 0, 0.75, 0.5, 1.0),
        ValPoint(19, 1, 0.625, None, 2.0),
        ValPoint(19, 1, 0.5, 0.25, 2.5),  # a second pass at the same step gets its own row
        ValPoint(45, 4, 0.125, 0.875, 3.0),  # after the last stored step
    ]
    header, rows = read_csv(write_metrics_csv(tmp_path / "m.csv", steps, vals))
    vl, va = header.index("val_loss"), header.index("val_accuracy")
    assert len(rows) == 32
    assert rows[9][vl] == "0.75" and rows[9][va] == "0.5"
    assert rows[19][vl] == "0.625" and rows[19][va] == ""
    assert rows[20][0] == "19" and rows[20][1:vl] == [""] * (vl - 1) and rows[20][vl] == "0.5"
    assert rows[21][0] == "20" and rows[21][vl] == ""
    assert rows[-1][0] == "45" and rows[-1][vl] == "0.125" and rows[-1][va] == "0.875"
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)


def test_csv_extra_scalar_columns(tmp_path: Path):
    """A column per extra scalar series, empty where it was not logged; points off the step rows (or a
    second at a step) on rows of their own, shared by the series logged there; unique, quoted names."""
    steps = make_steps(30)
    scalars = {
        "val/top5": (np.array([9, 19, 19, 40]), np.array([0.5, 0.625, 0.75, 0.875])),
        "a, b": (np.array([4, 40]), np.array([1.5, -2.0])),
        "val_loss": (np.array([29]), np.array([0.25])),  # clashes with the validation column
    }
    vals = [ValPoint(19, 1, 0.125, None, 2.0)]
    header, rows = read_csv(write_metrics_csv(tmp_path / "m.csv", steps, vals, scalars))
    assert header[-5:] == ["val_loss", "val_accuracy", "a, b", "val/top5", "val_loss.1"]
    top5, ab, vl = header.index("val/top5"), header.index("a, b"), header.index("val_loss")
    assert [r[0] for r in rows] == [str(s) for s in range(20)] + ["19"] + [str(s) for s in range(20, 30)] + ["40"]
    assert rows[9][top5] == "0.5" and rows[19][top5] == "0.625" and rows[19][vl] == "0.125"
    assert rows[20][top5] == "0.75" and rows[20][1:top5 - 1] == [""] * (top5 - 2)  # the second point at 19
    assert rows[4][ab] == "1.5" and rows[30][header.index("val_loss.1")] == "0.25"
    assert rows[-1][ab] == "-2.0" and rows[-1][top5] == "0.875"  # off the steps: one row for both
    assert sum(1 for r in rows for c in (top5, ab) if r[c]) == 6


def test_csv_of_stored_steps_starting_late(tmp_path: Path):
    steps = dict(make_steps(20))
    steps["step"] = steps["step"] + 100
    _, rows = read_csv(write_metrics_csv(tmp_path / "m.csv", steps, [ValPoint(50, 0, 1.0, None, 0.0)]))
    assert rows[0][0] == "50" and rows[1][0] == "100" and rows[-1][0] == "119"


def test_csv_empty_run(tmp_path: Path):
    steps = RunStore._empty(None, None)
    header, rows = read_csv(write_metrics_csv(tmp_path / "m.csv", steps, []))
    assert header[:6] == ["step", "epoch", "time", "lr", "loss", "grad_norm"] and rows == []


def test_csv_rejects_ragged_columns(tmp_path: Path):
    steps = dict(make_steps(5))
    steps["loss"] = steps["loss"][:3]
    with pytest.raises(ConfigError, match="loss"):
        write_metrics_csv(tmp_path / "m.csv", steps, [])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_csv_million_rows_is_fast(tmp_path: Path):
    """A million rows cost about ten times a hundred thousand (linear, chunked), never more than twice
    that: bounded relative to the same writer on this machine, not by wall-clock seconds."""
    n = 1_000_000
    rng = np.random.default_rng(1)
    lr = np.full((n, 2), 1e-3)
    lr[n // 2 :] = 3e-4
    steps = {
        "step": np.arange(n, dtype=np.int64),
        "epoch": (np.arange(n) // 5000).astype(np.int32),
        "time": np.cumsum(rng.exponential(1 / 2000, n)),
        "loss": np.abs(2.5 + np.cumsum(rng.normal(0, 0.01, n))).astype(np.float32).astype(np.float64),
        "grad_norm": np.abs(rng.normal(1, 0.3, n)).astype(np.float32),
        "lr": lr,
    }
    vals = [ValPoint(s, s // 5000, 0.5, 0.9, 0.0) for s in range(4999, n, 5000)]
    tenth = {k: v[: n // 10] for k, v in steps.items()}
    t0 = time.perf_counter()
    write_metrics_csv(tmp_path / "tenth.csv", tenth, [v for v in vals if v.step < n // 10])
    small = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = write_metrics_csv(tmp_path / "m.csv", steps, vals)
    elapsed = time.perf_counter() - t0
    log.info("metrics.csv: 1e6 rows in %.2f s (%.0f MB), 1e5 in %.2f s", elapsed, path.stat().st_size / 1e6, small)
    print(f"metrics.csv: 1e6 rows in {elapsed:.2f} s, 1e5 rows in {small:.2f} s")
    assert elapsed < 20 * small, (elapsed, small)
    with open(path) as fh:
        fh.readline()
        first = fh.readline().split(",")
    assert float(first[4]) == steps["loss"][0]
    assert sum(1 for _ in open(path)) == n + 1


# --------------------------------------------------------------------------- JSON


def test_run_json(tmp_path: Path):
    events = [Event(3, "set_lr", {"lr": 0.01}, 1.5), Event(7, "diverged", {"message": "loss is nan"}, 2.0)]
    vals = [ValPoint(4, 0, math.nan, None, 1.0), ValPoint(9, 1, 0.5, 0.875, 2.0)]
    path = write_run_json(
        tmp_path / "run.json",
        run={"id": 3, "name": "r", "best_loss": math.inf},
        config={"lr": np.float64(0.1), "schedule": None, "milestones": (1, 2)},
        events=events,
        validation=vals,
        summary={"final_loss": math.nan, "steps": np.int64(10)},
    )
    text = path.read_text()
    assert "\n  " in text  # pretty
    doc = json.loads(text)
    assert doc["format"] == "lrviz-run/1"
    assert doc["run"]["best_loss"] is None
    assert doc["config"] == {"lr": 0.1, "schedule": None, "milestones": [1, 2]}
    assert doc["summary"] == {"final_loss": None, "steps": 10}
    assert doc["events"] == [
        {"step": 3, "kind": "set_lr", "data": {"lr": 0.01}, "time": 1.5},
        {"step": 7, "kind": "diverged", "data": {"message": "loss is nan"}, "time": 2.0},
    ]
    assert doc["validation"][0] == {"step": 4, "epoch": 0, "loss": None, "accuracy": None, "time": 1.0}
    assert doc["validation"][1]["accuracy"] == 0.875


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_kinds(tmp_path: Path):
    assert atomic_write(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "b.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert atomic_write(tmp_path / "c.txt", lambda fh: fh.write(b"x" * 10)).read_bytes() == b"x" * 10
    assert no_temp_files(tmp_path)
    mode = (tmp_path / "a.bin").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_failed_write_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "metrics.csv"
    target.write_text("old")

    def half_then_fail(fh):
        fh.write(b"partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert no_temp_files(tmp_path)


def test_permission_denied_is_a_config_error(tmp_path: Path, monkeypatch):
    target = tmp_path / "out.csv"

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export.os, "open", denied)
    with pytest.raises(ConfigError) as info:
        atomic_write(target, b"x")
    assert str(info.value) == f"cannot write {target}: permission denied — choose another folder"
    assert not target.exists()


def test_replace_failure_removes_the_temp_file(tmp_path: Path, monkeypatch):
    def denied(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export.os, "replace", denied)
    with pytest.raises(ConfigError, match="permission denied"):
        atomic_write(tmp_path / "x.csv", b"x")
    assert list(tmp_path.iterdir()) == []


@needs_permissions
def test_read_only_folder(tmp_path: Path):
    with read_only_folder(tmp_path) as folder:
        with pytest.raises(ConfigError, match="permission denied"):
            atomic_write(folder / "x.csv", b"x")
        assert list(folder.iterdir()) == []


def test_missing_folder_and_folder_target(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        atomic_write(tmp_path / "nope" / "x.csv", b"x")
    with pytest.raises(ConfigError, match="is a folder"):
        atomic_write(tmp_path, b"x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write"):
        atomic_write(tmp_path / "file" / "x.csv", b"x")


# --------------------------------------------------------------------------- whole runs


@pytest.fixture
def stored_run(tmp_path: Path):
    store = RunStore(tmp_path / "store")
    run_id = store.create_run(script_path="/x/mnist_mlp.py", script_hash="h", config={"lr": 0.05, "optimizer": "sgd"},
                              device="cpu", name="first try")
    store.set_status(run_id, "running")
    steps = make_steps(120, groups=2)
    store.append_steps(run_id, 0, {k: v for k, v in steps.items() if k != "step"})
    store.add_events(run_id, [Event(60, "set_lr", {"lr": 0.01}, 1.0)])
    store.add_validation(run_id, [ValPoint(59, 5, 0.5, 0.75, 1.0), ValPoint(119, 11, 0.25, 0.875, 2.0)])
    store.add_scalars(run_id, "val/top5", [59, 119], [0.5, math.nan], [1.0, 2.0])
    store.set_status(run_id, "finished", summary={"best_loss": 0.1, "final_val_loss": math.nan})
    yield store, run_id, steps
    store.close()


def test_export_run_csv_and_json(stored_run, tmp_path: Path):
    store, run_id, steps = stored_run
    out = tmp_path / "exports" / "run1"
    paths = export_run(store, "first try", out, formats="csv,json")
    assert paths == [out / "metrics.csv", out / "run.json"]
    header, rows = read_csv(out / "metrics.csv")
    assert len(rows) == 120 and "lr_1" in header
    assert float(rows[7][header.index("loss")]) == steps["loss"][7]
    assert rows[59][header.index("val_loss")] == "0.5"
    doc = json.loads((out / "run.json").read_text())
    assert doc["scalars"] == {"val/top5": {"step": [59, 119], "value": [0.5, None], "time": [1.0, 2.0]}}
    assert [r[header.index("val/top5")] for r in rows[58:60]] == ["", "0.5"]
    assert doc["run"]["id"] == run_id and doc["run"]["name"] == "first try" and doc["run"]["kind"] == "lrviz"
    assert doc["run"]["script"] == "mnist_mlp.py" and doc["run"]["status"] == "finished"
    assert doc["config"]["lr"] == 0.05
    assert doc["events"][0]["kind"] == "set_lr"
    assert len(doc["validation"]) == 2
    assert no_temp_files(out)


def test_export_unknown_format(stored_run, tmp_path: Path):
    store, run_id, _ = stored_run
    with pytest.raises(ConfigError) as info:
        export_run(store, run_id, tmp_path / "o", formats=["csv", "gif"])
    assert "png, svg, pdf, csv, json, tb" in str(info.value) and "gif" in str(info.value)
    assert not (tmp_path / "o").exists()


def test_export_unknown_run(stored_run, tmp_path: Path):
    store, _, _ = stored_run
    with pytest.raises(StoreError):
        export_run(store, 999, tmp_path / "o", formats="csv")


def test_plots_without_a_renderer_are_a_config_error(stored_run, tmp_path: Path, monkeypatch):
    store, run_id, _ = stored_run
    monkeypatch.setattr(export, "_plot_renderer", None)  # as in a process that never loaded the Qt layer
    with pytest.raises(ConfigError, match="plot export needs the app's renderer"):
        export_run(store, run_id, tmp_path / "o", formats="png,csv")
    assert not (tmp_path / "o").exists()
    assert export_run(store, run_id, tmp_path / "o", formats="csv,json")  # no plot asked: fine


def test_lrviz_export_without_qt_says_what_to_install(stored_run, tmp_path: Path, monkeypatch, capsys):
    from lrviz.cli import main

    store, run_id, _ = stored_run
    monkeypatch.setattr(export, "_plot_renderer", None)
    monkeypatch.setitem(sys.modules, "lrviz.ui.render", None)  # import fails as if Qt were missing
    assert main(["export", str(run_id), "--store", str(store.path), "--out", str(tmp_path / "o"),
                 "--format", "png"]) == 1
    assert "plot export needs PySide6" in capsys.readouterr().err


def test_parse_formats():
    assert parse_formats(None) == ("png", "csv", "json")
    assert parse_formats(" PNG, .svg ,csv,png") == ("png", "svg", "csv")
    with pytest.raises(ConfigError, match="no export format"):
        parse_formats(" , ")


def test_describe_run():
    text = export.describe_run(
        {"name": "mnist #3", "script_path": "/a/mnist.py"},
        {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "schedule": "StepLR:step_size=10"},
    )
    assert text == "mnist #3 — mnist.py · sgd lr=0.1 momentum=0.9 · StepLR:step_size=10"


def test_core_export_does_not_import_qt():
    code = (
        "import sys, lrviz.export\n"
        "bad = [m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph', 'lrviz.ui'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_export_engine_from_memory(tmp_path: Path):
    from types import SimpleNamespace

    steps = make_steps(40)
    buffer = StepBuffer.from_columns({k: v for k, v in steps.items() if k != "step"})
    engine = SimpleNamespace(
        experiment=SimpleNamespace(path=Path("/x/toy.py"), source_hash="h"),
        config=SimpleNamespace(to_dict=lambda: {"lr": 0.05, "optimizer": "adam"}),
        buffer=buffer,
        events=[Event(10, "set_lr", {"lr": 0.01}, 0.5)],
        validation=[ValPoint(39, 3, 0.5, None, 1.0)],
        summary=lambda: {"steps": 40, "best_loss": 0.25, "final_loss": math.nan},
        run_id=None, name=None, device="cpu", state="finished", error=None,
    )
    paths = export.export_engine(engine, tmp_path / "out", formats="csv,json")
    assert [p.name for p in paths] == ["metrics.csv", "run.json"]
    header, rows = read_csv(paths[0])
    assert len(rows) == 40 and rows[39][header.index("val_loss")] == "0.5"
    doc = json.loads(paths[1].read_text())
    assert doc["run"]["name"] == "toy" and doc["run"]["status"] == "finished"
    assert doc["summary"]["final_loss"] is None and doc["config"]["optimizer"] == "adam"
