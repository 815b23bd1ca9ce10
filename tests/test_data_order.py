"""lrviz trains on exactly the batches the script's own loop would.

A seeded ``DataLoader(generator=g)`` and a plain ``shuffle=True`` loader (order from the global RNG):
loading a script draws nothing from either.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine
from lrviz.experiment import load_experiment

SCRIPTS = Path(__file__).parent / "scripts"
SEEDED = SCRIPTS / "seeded_loader.py"



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
