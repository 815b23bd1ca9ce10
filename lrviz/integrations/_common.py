"""What both trainer callbacks share: importing the trainer's package, starting a tracked run safely."""

from __future__ import annotations

import importlib
import json
import math
import sys
from typing import Any

from lrviz.tracking import TrackedRun

#: Under several processes only rank 0 records; steering one rank alone would train different weights.
MULTI_PROCESS = ("it trains in {n} processes and lrviz steers one process only for now "
                 "(rank 0 records; watch it, steer with the trainer's own settings)")


def need(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"lrviz.integrations.{extra} needs {what}, which is not installed here "
                          f"({exc}): pip install 'lrviz[{extra}]'") from exc


def start_run(optimizers: list[Any], **options: Any) -> TrackedRun | None:
    """A started :class:`TrackedRun`, or None (said once on stderr) when lrviz cannot record.

    The user's training always goes on: a store that cannot be opened is lrviz's problem, not theirs.
    """
    try:
        run = TrackedRun(optimizers if len(optimizers) > 1 else optimizers[0], **options)
        return run.start()
    except Exception as exc:  # noqa: BLE001 - never stop the user's training
        print(f"lrviz: warning: could not start recording ({type(exc).__name__}: {exc}); "
              "training continues without lrviz", file=sys.stderr)
        return None


def plain(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that are plain JSON values (numbers, strings, booleans, short lists), for a run's config."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            continue
        if len(text) <= 200:
            out[str(key)] = value
    return out


def scalar(value: Any) -> float | None:
    """A logged value as a float (one host read), or None when it is not a single number."""
    try:
        if hasattr(value, "numel"):
            if value.numel() != 1:
                return None
            return float(value.item())
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class TrackOptions:
    """What a trainer callback keeps of :func:`lrviz.track`'s options, for each run it starts."""

    def _keep_track_options(self, name: str | None, store: Any, listen: Any, config: dict[str, Any] | None,
                            grad_norm: bool, quiet: bool) -> None:
        self.name = name
        self.store = store
        self.listen = listen
        self.config = dict(config or {})
        self.grad_norm = grad_norm
        self.quiet = quiet
