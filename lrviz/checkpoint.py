"""Checkpoints: everything needed to continue a run exactly from a step.

A checkpoint holds the model and optimizer state, the schedule's state, every RNG (Python, NumPy,
torch CPU and CUDA), the step, the epoch and the position in the epoch (with the RNG state at the
epoch's start, so the data order can be rebuilt). Files are written with ``torch.save`` beside the
run store and read back with ``weights_only=True``: only tensors and plain Python values inside.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

FORMAT = 1


def capture_rng() -> dict[str, Any]:
    """The state of every RNG lrviz seeds, as weights_only-loadable values."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Put every RNG back as ``capture_rng`` found it."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointInfo:
    """Where a checkpoint is and what it holds, as recorded in a 'checkpoint' event."""

    path: Path
    step: int  # the next step to run: steps 0..step-1 are done
    reason: str
    loss: float | None = None


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; ConfigError when it is missing or not one."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint {p} does not exist (deleted with its run?)")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {p}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{p} is not an lrviz checkpoint (or from another version)")
    return data
