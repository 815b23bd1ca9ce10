"""What a run offers its live endpoint: records, state, lab data, and commands.

:class:`RunSource` serves anything that trains and records like :class:`lrviz.engine.TrainingEngine`
(the engine itself, a :class:`lrviz.track.TrackedRun`): a recorder's lists, a ``control``, ``submit``.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from lrviz.states import is_terminal

#: Per-layer statistics go out at most this often (seconds): they are a few floats per layer.
LAYERS_EVERY_S = 0.5


class RunSource:
    """Serves a run (see :class:`lrviz.live.endpoint.LiveSource`)."""

    def __init__(self, engine: Any, *, store_path: str | None = None):
        self.engine = engine
        self.done = engine.done
        self.store_path = store_path

    def describe(self) -> dict[str, Any]:
        eng = self.engine
        own = getattr(eng, "describe_live", None)
        if own is not None:
            return {**own(), "store": self.store_path}
        exp = eng.experiment
        return {
            "kind": "engine", "pid": os.getpid(), "run_id": eng.run_id, "name": eng.name or exp.name,
            "script_path": str(exp.path), "script_name": exp.name, "config": eng.config.to_dict(),
            "store": self.store_path, "has_surface": callable(getattr(exp.module, "probe", None)),
        }

    def snapshot(self) -> dict[str, Any]:
        eng = self.engine
        det = eng.detection
        out: dict[str, Any] = {
            "state": str(eng.state), "step": eng.steps_done, "epoch": eng.epoch, "total_steps": eng.total_steps,
            "lrs": list(eng.lrs), "run_id": eng.run_id, "device": str(eng.device) if eng.device else None,
            "detection": det.to_dict() if det is not None else None,
            "pause_requested": bool(eng.control.pause_requested), "pace": eng.control.pace,
            "groups": eng.buffer.groups if eng.buffer is not None else None,
        }
        if eng.error:
            out["error"] = str(eng.error)
            out["error_detail"] = eng.error_detail
        if is_terminal(eng.state) and eng.done.is_set():
            out["summary"] = eng.summary()
        return out

    def records(self) -> tuple[Any, list, list]:
        eng = self.engine
        return eng.buffer, eng.events, eng.validation

    def submit(self, kind: str, data: dict[str, Any]) -> Future:
        return self.engine.submit(kind, data)

    def lab_updates(self, cursor: dict[str, Any]) -> list[dict[str, Any]]:
        """New lab data since ``cursor`` (which this updates): probes, range-test progress, layers."""
        eng = self.engine
        out: list[dict[str, Any]] = []
        steps = eng.probe_steps
        i = cursor.get("probe", 0)
        n = len(steps)
        if n > i:
            values = {k: v[i:n] for k, v in list(eng.probe_values.items())}
            out.append({"kind": "probe", "start": i, "steps": steps[i:n], "values": values})
            cursor["probe"] = n
        progress = eng.range_test_progress
        if cursor.get("rt_list") is not progress:  # a new range test started
            cursor["rt_list"], cursor["rt"] = progress, 0
            if progress or cursor.get("rt_seen"):
                out.append({"kind": "range_test", "reset": True, "start": 0, "points": []})
        j = cursor["rt"]
        m = len(progress)
        if m > j:
            out.append({"kind": "range_test", "start": j, "points": [list(p) for p in progress[j:m]]})
            cursor["rt"], cursor["rt_seen"] = m, True
        probe = eng.layer_probe
        if probe is not None:
            now = time.monotonic()
            if now - cursor.get("layers_at", 0.0) >= LAYERS_EVERY_S or eng.done.is_set():
                arrays = probe.as_arrays()
                k = len(arrays["step"])
                sent = cursor.get("layers", 0)
                if k != sent:
                    start = sent if k > sent else 0  # fewer rows: a roll-back truncated them
                    cursor["layers"], cursor["layers_at"] = k, now
                    out.append({"kind": "layers", "start": start, "names": arrays["names"],
                                **{key: _plain(arrays[key][start:]) for key in
                                   ("step", "grad_norm", "weight_norm", "update_ratio")}})
        return out


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


#: The name it had when only the engine served.
EngineSource = RunSource
