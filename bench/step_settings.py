"""What the step settings cost: mixed precision, gradient accumulation and clipping on the tiny MLP.

Runs the engine headless (no store) with each setting in turn, interleaved over several rounds, and
prints the CPU time per step of the training thread against a plain run (CPU time, not wall time, so
other work on a shared machine disturbs it less). Then the cost of clipping alone: the engine's
flat-buffer clip (one dot product, torch's formula) against calling torch.nn.utils.clip_grad_norm_.

    .venv/bin/python bench/step_settings.py [--rounds 6] [--steps 1500]
"""

from __future__ import annotations

import statistics
import time
import timeit
from pathlib import Path

import torch
from _args import rounds_and_steps

from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine
from lrviz.experiment import load_experiment
from lrviz.staging import GradNorm

HERE = Path(__file__).parent
SETTINGS = {
    "plain": {},
    "clip_grad_norm 1e9 (never clips)": {"clip_grad_norm": 1e9},
    "clip_grad_norm 0.1 (always clips)": {"clip_grad_norm": 0.1},
    "accumulate 4 (4 batches a step)": {"accumulate": 4},
    "amp bf16 (CPU)": {"amp": "bf16"},
}


def cpu_per_step(exp, steps: int, settings: dict) -> float:
    cfg = RunConfig(**exp.defaults).merged({"steps": steps, "epochs": None, **settings})
    eng = TrainingEngine(exp, cfg)
    t = time.thread_time()
    eng.run()
    assert eng.state == "finished", eng.error
    return (time.thread_time() - t) / steps


def clip_alone(exp, number: int = 2000) -> tuple[float, float]:
    """Seconds per call: the engine's clip (dot, coefficient, one multiply) and torch's clip_grad_norm_."""
    model = exp.make_model()
    data, _ = exp.make_data()
    x, y = next(iter(data))
    exp.module.loss_fn(model(x), y).backward()
    params = list(model.parameters())
    gnorm = GradNorm(params)
    gnorm.squared()  # binds the gradients into one flat buffer, as in the engine

    def ours() -> None:
        gnorm.flat.mul_(torch.clamp(1e9 / (gnorm.squared().sqrt() + 1e-6), max=1.0))

    return (timeit.timeit(ours, number=number) / number,
            timeit.timeit(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9), number=number) / number)


def main() -> None:
    args = rounds_and_steps(__doc__, rounds=6, steps=1500)
    exp = load_experiment(HERE / "tiny_mlp.py")
    cpu_per_step(exp, 200, {})  # warm up
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for _ in range(args.rounds):
        for name, settings in SETTINGS.items():
            times[name].append(cpu_per_step(exp, args.steps, settings))
    base = statistics.median(times["plain"])
    print(f"torch {torch.__version__}, 1 thread; CPU time per step, median of {args.rounds} interleaved rounds")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:36s} {m * 1e6:7.1f} us  x{m / base:.2f}")
    ours, theirs = clip_alone(exp)
    print(f"clipping alone: engine {ours * 1e6:.1f} us, torch.nn.utils.clip_grad_norm_ {theirs * 1e6:.1f} us "
          f"(x{theirs / ours:.1f})")


if __name__ == "__main__":
    main()
