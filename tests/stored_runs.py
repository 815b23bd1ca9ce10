"""Runs made the way a user makes them (the command line, an example's ``main()``), and what the store
holds of them: for the tests that compare a run with its fork, or check what an example recorded."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from lrviz.cli import main
from lrviz.experiment import example_paths, examples_dir, is_plain_script
from lrviz.store.runs import RunInfo, RunStore

TINY = Path(__file__).parent / "scripts" / "tiny.py"


def run_and_fork(store: str, run: list[str], fork: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``lrviz run tiny.py RUN...`` into an empty ``store`` (run 1), then ``lrviz run tiny.py --fork FORK...``
    (run 2), both quiet; the stored steps of the two."""
    assert main(["run", str(TINY), *run, "--store", store, "--quiet"]) == 0
    assert main(["run", str(TINY), "--fork", *fork, "--store", store, "--quiet"]) == 0
    with RunStore(store) as s:
        return s.load_steps(1), s.load_steps(2)


def run_plain_example(name: str, argv: list[str], store: Path) -> tuple[RunInfo, dict[str, np.ndarray], list[Any]]:
    """Check that the example ``name`` is a plain script (not listed with the experiment examples), call its
    ``main(ARGV... --store STORE)``; the run it recorded: its info, stored steps and validation points."""
    path = examples_dir() / f"{name}.py"
    assert is_plain_script(path) and path not in example_paths()
    callback = importlib.import_module(f"lrviz.resources.examples.{name}").main([*argv, "--store", str(store)])
    with RunStore(store) as s:
        info = s.get_run(callback.run.run_id)
        return info, s.load_steps(info.id), s.load_validation(info.id)
