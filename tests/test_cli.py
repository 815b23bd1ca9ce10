"""The headless command line: run with interventions, outputs, replay, runs, crash safety."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lrviz.cli import main
from lrviz.store import RunStore

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_with_interventions_writes_exact_metrics(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "regression", "--steps", "300", "--lr", "0.05", "--at", "100:lr=0.01",
               "--at", "200:schedule=CosineAnnealingLR:T_max=100", "--out", str(out),
               "--store", str(tmp_path / "store"), "--quiet"])
    assert rc == 0
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 300
    assert list(rows[0])[:5] == ["step", "epoch", "time", "lr", "loss"]
    assert [int(r["step"]) for r in rows] == list(range(300))
    lr = np.array([float(r["lr"]) for r in rows])
    assert all(r["lr"] == "0.05" for r in rows[:100])
    assert all(r["lr"] == "0.01" for r in rows[100:200])
    t = np.arange(100)
    cosine = 0.01 * (1 + np.cos(np.pi * t / 100)) / 2
    np.testing.assert_allclose(lr[200:], cosine, rtol=1e-12, atol=0)
    assert lr[200] == 0.01
    evaluated = [r for r in rows if r["val_loss"]]
    assert evaluated and all(float(r["val_loss"]) > 0 for r in evaluated)
    run = json.loads((out / "run.json").read_text())
    kinds = [(e["step"], e["kind"]) for e in run["events"]]
    assert (100, "set_lr") in kinds and (200, "set_schedule") in kinds
    assert run["config"]["lr"] == 0.05
    assert (out / "loss.png").stat().st_size > 5000 and (out / "lr.png").stat().st_size > 5000


def test_replay_is_bit_exact_on_cpu(tmp_path, capsys):
    store = str(tmp_path / "store")
    rc = main(["run", str(SCRIPTS / "tiny.py"), "--steps", "150", "--lr", "0.03", "--seed", "11",
               "--at", "40:lr=0.01", "--at", "90:schedule=StepLR:step_size=10,gamma=0.7",
               "--at", "60:momentum=0.5", "--store", store, "--quiet"])
    assert rc == 0
    capsys.readouterr()
    assert main(["replay", "1", "--store", store, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "identical (150 steps)" in err
    with RunStore(store) as s:
        a, b = s.load_steps(1), s.load_steps(2)
        assert a["loss"].tobytes() == b["loss"].tobytes()
        assert a["lr"].tobytes() == b["lr"].tobytes()
        assert s.get_run(2).name == f"replay of {s.get_run(1).name}"


def test_replay_of_a_stopped_app_style_run_replays_its_live_commands(tmp_path, capsys):
    """Commands sent live (as the app does) are recorded and replayed at the same steps."""
    from lrviz.config import RunConfig
    from lrviz.engine import TrainingEngine
    from lrviz.experiment import load_experiment

    exp = load_experiment(SCRIPTS / "tiny.py")
    with RunStore(tmp_path / "store") as s:
        eng = TrainingEngine(exp, RunConfig(lr=0.05, steps=100_000, seed=2), s)
        eng.start()
        while eng.step < 30:
            time.sleep(0.001)
        eng.pause()
        while eng.state != "paused":
            time.sleep(0.001)
        eng.set_lr(0.02)
        eng.set_schedule("ExponentialLR:gamma=0.995")
        eng.resume()
        while eng.step < 120:
            time.sleep(0.001)
        eng.stop()
        eng.join(10)
        n = s.get_run(eng.run_id).steps
    assert main(["replay", "1", "--store", str(tmp_path / "store"), "--quiet"]) == 0
    assert f"identical ({n} steps)" in capsys.readouterr().err


def test_runs_lists_and_export_writes_formats(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["run", "regression", "--steps", "20", "--store", store, "--quiet", "--name", "first"]) == 0
    capsys.readouterr()
    assert main(["runs", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert "first" in listing and "finished" in listing and " 20 " in listing
    out = tmp_path / "exp"
    assert main(["export", "first", "--store", store, "--out", str(out), "--format", "csv,json,svg"]) == 0
    assert len(read_csv(out / "metrics.csv")) == 20
    assert (out / "loss.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert main(["export", "nope", "--store", store]) == 1
    assert "no run 'nope'" in capsys.readouterr().err


def test_killed_run_leaves_an_intact_store_marked_interrupted(tmp_path):
    """SIGKILL mid-run: the store opens, passes integrity_check, holds all but ~the last second."""
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrviz", "run", str(SCRIPTS / "tiny.py"), "--steps", "10000000",
         "--store", str(store), "--quiet"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ},
    )
    db = store / "runs.sqlite"
    # wait until steps are being persisted, then let it train a while
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if db.exists():
            with sqlite3.connect(db, timeout=5) as c:
                try:
                    if c.execute("select count(*) from runs where status='running'").fetchone()[0]:
                        break
                except sqlite3.OperationalError:
                    pass
    time.sleep(2.5)
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    proc.wait(10)
    with sqlite3.connect(db) as c:
        assert c.execute("pragma integrity_check").fetchone()[0] == "ok"
    with RunStore(store) as s:
        assert s.integrity_ok()
        info = s.list_runs()[0]
        assert info.status == "interrupted"
        steps = s.load_steps(info.id)
        n = len(steps["loss"])
        assert n == info.steps > 0
        assert list(steps["step"][:5]) == [0, 1, 2, 3, 4] and steps["step"][-1] == n - 1
        # the last stored step is at most about a second older than the kill
        last_time = float(steps["time"][-1])
        started = info.started_at
        assert started is not None
        lost = killed_at - (started + last_time)
        assert lost < 1.5, f"lost {lost:.2f} s of training"


@pytest.mark.parametrize("args,needle", [
    (["run", "regression", "--lr", "-1"], "learning rate"),
    (["run", "regression", "--optimizer", "adamax"], "unknown optimizer"),
    (["run", "regression", "--at", "x:lr=1"], "step number"),
])
def test_bad_settings_exit_1_with_a_message(tmp_path, capsys, args, needle):
    assert main(args + ["--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
