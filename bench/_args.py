"""The command line the per-step benchmarks share (imported by the scripts beside it; not a benchmark)."""

from __future__ import annotations

import argparse

import torch


def rounds_and_steps(doc: str, rounds: int, steps: int) -> argparse.Namespace:
    """Parse ``--rounds`` and ``--steps`` (with these defaults) and put torch on one thread, so the
    figures compare the per-step cost of the loop, not the machine's thread scheduling."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps", type=int, default=steps)
    args = ap.parse_args()
    torch.set_num_threads(1)
    return args
