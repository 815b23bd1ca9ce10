"""lrviz trains on exactly the batches the script's own loop would, and continues them exactly.

A seeded ``DataLoader(generator=g)`` and a plain ``shuffle=True`` loader (order from the global RNG):
loading a script draws nothing from either; a fork with no new settings equals its parent step for
step (the parent's later interventions included; the seeded loader's case is in test_checkpoints.py);
a resume equals an uninterrupted run; a replay of a fork child starts at its fork; a range test
mid-run leaves the data order alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lrviz.cli import main
from lrviz.config import RunConfig
from lrviz.engine import Origin, TrainingEngine
from lrviz.experiment import load_experiment
from lrviz.store.runs import RunStore

SCRIPTS = Path(__file__).parent / "scripts"
SEEDED = SCRIPTS / "seeded_loader.py"
TINY = SCRIPTS / "tiny.py"


@pytest.fixture
def seeded():
    exp = load_experiment(SEEDED)
    exp.module.SEEN.clear()
    return exp


def wait_for(pred, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def own_loop_order(exp, seed: int, epochs: int, generator: bool) -> list[list[int]]:
    """The batches (dataset indices) of the script's own loop: seed, build_model(), build_data(), iterate."""
    mod = exp.module
    torch.manual_seed(seed)
    mod.build_model()
    train, _val = mod.build_data(generator=generator)
    return [batch[2].tolist() for _ in range(epochs) for batch in train]


@pytest.mark.parametrize("generator", [True, False], ids=["DataLoader(generator=g)", "shuffle=True"])
def test_training_sees_the_scripts_own_data_order(seeded, generator):
    cfg = RunConfig(lr=0.05, epochs=2, seed=3, params={"generator": generator})
    eng = TrainingEngine(seeded, cfg)
    assert eng.run() == "finished"
    assert seeded.module.SEEN == own_loop_order(seeded, 3, 2, generator)


def test_checking_the_data_draws_no_randomness_and_no_batch(seeded):
    torch.manual_seed(0)
    train, _ = seeded.make_data(None, {"generator": True})
    after_checks = torch.get_rng_state()
    torch.manual_seed(0)
    plain, _ = seeded.module.build_data(generator=True)
    assert torch.equal(after_checks, torch.get_rng_state())
    assert torch.equal(train.generator.get_state(), plain.generator.get_state())


def test_fork_with_no_new_settings_carries_the_parents_later_interventions(tmp_path):
    store = str(tmp_path)
    base = ["--store", store, "--quiet"]
    assert main(["run", str(TINY), "--steps", "200", "--checkpoint-every", "50", "--at", "130:lr=0.02",
                 "--at", "170:momentum=0.5", "--at", "170:schedule=ExponentialLR:gamma=0.99", *base]) == 0
    assert main(["run", str(TINY), "--fork", "1@100", *base]) == 0  # no new settings
    assert main(["run", str(TINY), "--fork", "1@100", "--lr", "0.01", *base]) == 0  # a new rate
    with RunStore(store) as s:
        parent, same, other = s.load_steps(1), s.load_steps(2), s.load_steps(3)
        kinds = [e.kind for e in s.load_events(2) if e.kind.startswith("set_")]
    assert same["loss"].tobytes() == parent["loss"][100:].tobytes()
    assert same["lr"].tobytes() == parent["lr"][100:].tobytes()
    assert kinds == ["set_lr", "set_hyperparams", "set_schedule"]
    # a fork with its own settings follows them, not the parent's plan
    assert np.all(other["lr"][:, 0] == 0.01)


def test_resume_with_a_seeded_loader_equals_an_uninterrupted_run(seeded, tmp_path):
    cfg = RunConfig(lr=0.05, momentum=0.9, steps=150, seed=2, checkpoint_every=40, params={"dropout": 0.1})
    ref = TrainingEngine(seeded, cfg)
    ref.run()
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(seeded, RunConfig(**{**cfg.to_dict(), "steps": 90}), store)  # checkpoints 0, 40, 80
        assert eng.run() == "finished"
        ck = eng.checkpoints[-1]
        assert ck.step == 80
        resumed = TrainingEngine(seeded, cfg, store, origin=Origin("resume", eng.run_id, ck.path, 80))
        assert resumed.run() == "finished"
        steps = store.load_steps(eng.run_id)
    assert list(steps["step"]) == list(range(150))
    assert steps["loss"].tobytes() == ref.buffer.view()["loss"].tobytes()


def test_replay_of_a_fork_child_starts_at_its_fork(tmp_path, capsys):
    store = str(tmp_path)
    base = ["--store", store, "--quiet"]
    assert main(["run", str(TINY), "--steps", "160", "--checkpoint-every", "60", *base]) == 0
    assert main(["run", str(TINY), "--fork", "1@120", "--lr", "0.01", "--at", "140:lr=0.03", *base]) == 0
    capsys.readouterr()
    assert main(["replay", "2", *base]) == 0
    assert "loss trace identical (40 steps)" in capsys.readouterr().err
    with RunStore(store) as s:
        child, replay = s.load_steps(2), s.load_steps(3)
        info = s.get_run(3)
    assert info.parent_id == 1 and info.fork_step == 120
    assert list(replay["step"]) == list(range(120, 160))
    assert replay["lr"].tobytes() == child["lr"].tobytes()


def test_range_test_mid_run_leaves_the_loaders_generator_alone(seeded):
    cfg = RunConfig(lr=0.05, momentum=0.9, steps=60, seed=1)
    ref = TrainingEngine(seeded, cfg)
    ref.run()
    eng = TrainingEngine(seeded, cfg)
    eng.start()
    wait_for(lambda: eng.step >= 20)
    eng.pause()
    wait_for(lambda: eng.state == "paused")
    try:
        eng.range_test(start=1e-5, end=1, steps=30).result(timeout=60)
    finally:
        eng.resume()
    assert eng.join(60) and eng.state == "finished"
    assert eng.buffer.view()["loss"].tobytes() == ref.buffer.view()["loss"].tobytes()
