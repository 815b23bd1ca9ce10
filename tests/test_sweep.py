"""LR sweeps: parsing the rates, one run per rate, divergence, speed of convergence, the table."""

from __future__ import annotations

import argparse
import csv
import math
import textwrap
from dataclasses import fields

import numpy as np
import pytest

from lrviz.config import RunConfig
from lrviz.errors import ConfigError, ScriptError
from lrviz.experiment import load_experiment
from lrviz.lab.sweep import (
    SweepRow,
    add_arguments,
    command,
    default_target,
    format_table,
    parse_lrs,
    run_sweep,
    smoothed,
    write_table_csv,
)

#: Full-batch linear regression: the loss's curvature is about 2, so SGD diverges above lr ~1.
LINEAR = textwrap.dedent(
    """
    import torch
    from torch import nn

    DEFAULTS = {"lr": 0.1, "optimizer": "sgd", "steps": 150, "seed": 0}

    def build_model():
        return nn.Linear(1, 1)

    def build_data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 1, generator=g)
        y = 2 * x + 1 + 0.1 * torch.randn(256, 1, generator=g)
        return [(x, y)], [(x[:64], y[:64])]

    loss_fn = nn.MSELoss()
    """
)
HIGH, GOOD, TINY = 3.0, 0.1, 0.01


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def linear(tmp_path):
    path = tmp_path / "linear.py"
    path.write_text(LINEAR)
    return load_experiment(path)


def base_config(exp, steps=150) -> RunConfig:
    return RunConfig(**exp.defaults).merged({"steps": steps, "device": "cpu"})


# ---- parse_lrs -----------------------------------------------------------------------------------------
def test_parse_log_range():
    assert parse_lrs("1e-4:1:5") == pytest.approx([1e-4, 1e-3, 1e-2, 0.1, 1.0], rel=1e-9)
    lrs = parse_lrs(" 1e-4 : 1 : 7 ")
    assert len(lrs) == 7 and lrs[0] == 1e-4 and lrs[-1] == 1.0
    ratios = np.diff(np.log(lrs))
    assert np.allclose(ratios, ratios[0], rtol=1e-4)  # evenly spaced in log
    assert parse_lrs("1:1e-2:3") == pytest.approx([1.0, 0.1, 0.01])  # descending is fine
    assert parse_lrs("0.01:0.01:1") == [0.01]


def test_parse_list_keeps_order():
    assert parse_lrs("0.1,0.03,0.01") == [0.1, 0.03, 0.01]
    assert parse_lrs(" 3e-4 , 1 ") == [3e-4, 1.0]
    assert parse_lrs("0.5") == [0.5]


@pytest.mark.parametrize("text", ["", "  ", "abc", "1e-4:1", "1e-4:1:2:3", "1e-4:1:0", "1e-4:1:x", "0:1:3",
                                  "1e-4:-1:3", "-1,0.1", "0.1,,0.2", "0.1,", "nan", "inf,0.1", "0.1:1:1",
                                  "1e-4:1:100000"])
def test_parse_errors(text):
    with pytest.raises(ConfigError):
        parse_lrs(text)


def test_parse_error_says_what_to_write():
    with pytest.raises(ConfigError, match=r"start:end:count"):
        parse_lrs("1e-4:1")
    with pytest.raises(ConfigError, match="'fast'"):
        parse_lrs("0.1,fast")


# ---- run_sweep -----------------------------------------------------------------------------------------
def test_sweep_rows_in_order_divergence_and_speed(linear):
    seen = []
    rows = run_sweep(linear, base_config(linear), [HIGH, GOOD, TINY], target_loss=0.05,
                     on_run=lambda i, eng: seen.append((i, eng)))
    assert [r.lr for r in rows] == [HIGH, GOOD, TINY]
    assert [i for i, _ in seen] == [0, 1, 2]
    assert [eng.config.lr for _, eng in seen] == [HIGH, GOOD, TINY]
    high, good, tiny = rows
    assert high.diverged and high.state == "diverged" and high.steps < 150
    assert high.steps_to_target is None
    assert not good.diverged and good.state == "finished" and good.steps == 150
    assert not tiny.diverged and tiny.state == "finished"
    assert good.steps_to_target is not None and tiny.steps_to_target is not None
    assert good.steps_to_target < tiny.steps_to_target
    assert good.final_loss < tiny.final_loss
    assert good.best_loss <= good.final_loss
    assert good.final_val_loss is not None and good.best_val_loss <= good.final_val_loss
    assert all(r.target_loss == 0.05 for r in rows)
    # steps_to_target is the first step whose smoothed (beta 0.9) training loss is <= the target
    loss = np.array(seen[1][1].buffer.view()["loss"])
    s = smoothed(loss, 0.9)
    k = good.steps_to_target
    assert s[k] <= 0.05 and np.all(s[:k] > 0.05)


def test_default_target_is_1_1_times_best_final_smoothed_loss(linear):
    engines = []
    rows = run_sweep(linear, base_config(linear, steps=100), [HIGH, GOOD, 0.03],
                     on_run=lambda i, eng: engines.append(eng))
    finals = [smoothed(np.array(e.buffer.view()["loss"]))[-1] for e in engines[1:]]
    target = 1.1 * min(finals)
    assert all(r.target_loss == pytest.approx(target) for r in rows)
    assert all(type(r.target_loss) is float for r in rows)
    assert rows[1].steps_to_target is not None  # the best run reaches 1.1 x its own final loss
    assert rows[0].steps_to_target is None  # diverged


def test_default_target_helper():
    assert default_target([0.5, 0.2, float("nan"), None]) == pytest.approx(0.22)
    assert default_target([-2.0, 1.0]) == pytest.approx(-1.8)  # 10% above a negative best
    assert default_target([float("inf")]) is None and default_target([]) is None


def test_stop_from_on_run_and_should_stop(linear):
    def stop_first(i, eng):
        if i == 0:
            eng.stop()

    rows = run_sweep(linear, base_config(linear, steps=50), [GOOD, TINY], on_run=stop_first)
    assert [r.state for r in rows] == ["stopped", "finished"]  # a stopped run is skipped, the sweep goes on

    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 1

    rows = run_sweep(linear, base_config(linear, steps=20), [GOOD, TINY, HIGH], should_stop=should_stop)
    assert [r.lr for r in rows] == [GOOD]


def test_sweep_runs_are_stored_with_names(linear, tmp_path):
    from lrviz.store.runs import RunStore

    store = RunStore(tmp_path / "runs.sqlite")
    try:
        rows = run_sweep(linear, base_config(linear, steps=60), [GOOD, HIGH], store=store)
        assert all(r.run_id is not None for r in rows)
        infos = {r.id: r for r in store.list_runs()}
        assert infos[rows[0].run_id].name == "sweep lr=0.1"
        assert infos[rows[1].run_id].status == "diverged"
    finally:
        store.close()


def test_a_broken_script_fails_the_sweep_at_once(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(LINEAR.replace("return nn.Linear(1, 1)", "raise RuntimeError('no model today')"))
    exp = load_experiment(path)
    seen = []
    with pytest.raises(ScriptError, match="no model today"):
        run_sweep(exp, base_config(exp), [GOOD, TINY], on_run=lambda i, e: seen.append(i))
    assert seen == [0]


def test_bad_rates_and_target_are_config_errors(linear):
    with pytest.raises(ConfigError):
        run_sweep(linear, base_config(linear), [])
    with pytest.raises(ConfigError):
        run_sweep(linear, base_config(linear), [0.1, -1.0])
    with pytest.raises(ConfigError):
        run_sweep(linear, base_config(linear), [0.1], target_loss=float("nan"))


def test_pause_on_divergence_becomes_stop(linear):
    cfg = base_config(linear, steps=60).merged({"divergence": "pause"})
    rows = run_sweep(linear, cfg, [HIGH])  # would otherwise wait forever for a resume
    assert rows[0].diverged


# ---- the table -----------------------------------------------------------------------------------------
def make_rows():
    return [
        SweepRow(lr=1.0, run_id=3, state="diverged", steps=7, final_loss=float("inf"), best_loss=0.9,
                 final_val_loss=None, best_val_loss=None, steps_to_target=None, diverged=True, target_loss=0.11),
        SweepRow(lr=0.1, run_id=4, state="finished", steps=100, final_loss=0.1, best_loss=0.09,
                 final_val_loss=0.12, best_val_loss=0.11, steps_to_target=42, diverged=False, target_loss=0.11),
        SweepRow(lr=1e-3, run_id=None, state="finished", steps=100, final_loss=0.5, best_loss=0.5,
                 final_val_loss=0.52, best_val_loss=0.52, steps_to_target=None, diverged=False, target_loss=0.11),
    ]


def test_csv_is_written_atomically_and_parses(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text("old")
    write_table_csv(make_rows(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv"]  # no temporary file left
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == tuple(fl.name for fl in fields(SweepRow))
        got = list(reader)
    assert [float(r["lr"]) for r in got] == [1.0, 0.1, 1e-3]
    assert math.isinf(float(got[0]["final_loss"]))
    assert got[0]["diverged"] == "true" and got[1]["diverged"] == "false"
    assert got[0]["steps_to_target"] == "" and int(got[1]["steps_to_target"]) == 42
    assert got[2]["run_id"] == "" and int(got[1]["run_id"]) == 4
    assert float(got[1]["best_val_loss"]) == 0.11


def test_csv_writes_numpy_numbers_as_plain_numbers(tmp_path):
    rows = make_rows()
    rows[1].target_loss = np.float64(0.25)
    rows[1].steps_to_target = np.int64(7)
    write_table_csv(rows, tmp_path / "sweep.csv")
    with (tmp_path / "sweep.csv").open(newline="") as f:
        got = list(csv.DictReader(f))
    assert got[1]["target_loss"] == "0.25" and got[1]["steps_to_target"] == "7"


def test_format_table():
    text = format_table(make_rows())
    lines = text.splitlines()
    assert "lr" in lines[0] and "to target" in lines[0]
    body = lines[2:5]
    assert len({len(line) for line in lines[:5]}) == 1  # fixed width
    assert "diverged" in body[0] and "42" in body[1] and "0.001" in body[2]
    assert "fastest to target: lr 0.1 (42 steps)" in text
    assert "diverged: 1 of 3 runs" in text
    assert "(no runs)" in format_table([])


# ---- the command ---------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(prog="lrviz sweep")
    add_arguments(p)
    return p.parse_args(argv)


def test_command_prints_the_table_and_writes_csv(linear, tmp_path, capsys):
    out = tmp_path / "out"
    args = parse([str(linear.path), "--lrs", f"{HIGH},{GOOD},{TINY}", "--steps", "60", "--out", str(out),
                  "--store", str(tmp_path / "runs.sqlite"), "--target-loss", "0.05"])
    assert command(args) == 0  # the sweep ran, though one run diverged
    captured = capsys.readouterr()
    assert "fastest to target: lr 0.1" in captured.out
    assert "run 1/3: lr 3" in captured.err
    with (out / "sweep.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["diverged"] for r in rows] == ["true", "false", "false"]
    assert all(r["run_id"] for r in rows)


def test_command_bad_input_is_a_config_error(linear, tmp_path):
    with pytest.raises(ConfigError, match="count"):
        command(parse([str(linear.path), "--lrs", "1e-4:1:zero", "--quiet"]))
    with pytest.raises(ConfigError, match="target-loss"):
        command(parse([str(linear.path), "--lrs", "0.1", "--target-loss", "low", "--quiet"]))
    with pytest.raises(ConfigError, match="PARAMS"):
        command(parse([str(linear.path), "--lrs", "0.1", "--param", "width=3", "--quiet"]))
