"""Devices: which are present, resolving ``auto``, moving batches."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError


def available_devices() -> list[str]:
    """The device choices that work on this machine, ``auto`` first."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; asking for one that is absent is a ConfigError."""
    present = available_devices()
    if name == "auto":
        for cand in ("cuda", "mps"):
            if cand in present:
                return torch.device(cand)
        return torch.device("cpu")
    if name not in present:
        raise ConfigError(f"device {name!r} is not available here; available: {', '.join(present)}")
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a batch (tuples, lists, dicts, nested) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        items = [to_device(b, device) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [to_device(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
