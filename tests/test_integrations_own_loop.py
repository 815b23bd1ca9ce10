"""The own-loop example: a plain script (not listed as an experiment), steerable from outside."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lrviz.cli import main
from lrviz.errors import ScriptError
from lrviz.experiment import example_paths, examples_dir, is_plain_script, resolve_script
from lrviz.store.runs import RunStore

WAIT = 120


def spawn(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lrviz.resources.examples.own_loop", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_own_loop_example_is_a_plain_script_not_an_experiment():
    path = examples_dir() / "own_loop.py"
    assert path.exists() and is_plain_script(path)
    assert path not in example_paths() and example_paths()  # the experiment examples are still listed
    assert not any(is_plain_script(p) for p in example_paths())
    with pytest.raises(ScriptError, match=r"plain training script.*python"):
        resolve_script("own_loop")


@pytest.mark.slow
def test_the_own_loop_example_trains_and_stores_its_run(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    proc = spawn("--epochs", "2", "--store", str(store_path))
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert "is live: `lrviz steer 1 --lr 0.01`" in out and "run 1 finished after 64 steps" in out
    with RunStore(store_path) as store:
        info = store.get_run(1)
        cols = store.load_steps(1)
        val = store.load_validation(1)
    assert info.status == "finished" and info.name == "own loop" and info.steps == 64
    assert [p.step for p in val] == [31, 63]
    # the cosine schedule of the loop itself, as used step by step
    assert cols["lr"][0, 0] == 0.05 and np.all(np.diff(cols["lr"][:, 0]) < 0)


@pytest.mark.slow
def test_the_own_loop_example_is_steered_and_stopped_from_another_process(tmp_path, capsys):
    store_path = tmp_path / "runs.sqlite"
    proc = spawn("--store", str(store_path))
    try:
        line = proc.stdout.readline()
        assert "is live" in line, line + proc.stderr.read()
        run_id = line.split("run ")[1].split()[0]
        assert main(["steer", run_id, "--lr", "0.01", "--store", str(store_path)]) == 0
        step = int(capsys.readouterr().out.split("from step")[1].split()[0])
        assert main(["steer", run_id, "--stop", "--store", str(store_path)]) == 0
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    with RunStore(store_path) as store:
        info = store.get_run(int(run_id))
        lr = store.load_steps(int(run_id))["lr"][:, 0]
    assert info.status == "stopped" and f"stopped after {info.steps} steps" in out
    assert lr[step - 1] != 0.01 and np.all(lr[step:] == 0.01)  # holds against the loop's cosine schedule
