"""``python -m lrviz worker``: the training process the app starts (the app never trains itself).

A worker starts warm (torch imported) and waits for one request at a time on stdin, answering on
stdout, one JSON object per line (a private pipe to its parent; the script's own prints go to
stderr):

- ``{"op": "inspect", "id": N, "script": PATH}``: load the script and describe it (its DEFAULTS,
  PARAMS, docstring, whether build_data takes a batch size, its 2-D surfaces sampled on a grid...),
  or the ScriptError. The worker stays available.
- ``{"op": "train", "id": N, "spec": {...}}``: train one run, served on a live endpoint; the
  answer ``{"t": "serving", "conn": {...}}`` tells the parent where to attach. The worker exits
  when the run ends (one run per process: a crash or a hang takes only that run).
- ``{"op": "exit"}``, or stdin closing while idle: exit.

SIGTERM while training ends the run as "stopped" in the store (what the app sends when a
cooperative stop got no answer); SIGKILL leaves the row for the app to mark.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, TextIO

from lrviz.errors import LrvizError, ScriptError

SURFACE_GRID = 120
#: The exit status of a worker terminated by SIGTERM (128 + 15, as a shell reports it).
TERMINATED = 143


class _Channel:
    """The private JSON-lines pipe to the parent (the real stdout, kept aside)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        from .protocol import jsonable

        line = json.dumps(jsonable(msg), allow_nan=False, separators=(",", ":"))
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()


def _private_stdout() -> TextIO:
    """Keep the real stdout for the protocol; point fd 1 (the script's prints) at stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    return os.fdopen(fd, "w", buffering=1)


def main(argv: list[str] | None = None) -> int:
    """Serve requests from the parent until told to exit (or until one run has ended)."""
    chan = _Channel(_private_stdout())
    import torch  # noqa: F401  (warm: the import is why a spare worker is started ahead)

    from lrviz.devices import available_devices

    chan.send({"t": "ready", "pid": os.getpid(), "devices": available_devices(),
               "python": sys.executable})
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except json.JSONDecodeError:
            chan.send({"t": "error", "message": "bad request line"})
            continue
        op = req.get("op")
        if op == "inspect":
            chan.send({"t": "inspected", "id": req.get("id"), **inspect(req.get("script"), req.get("params"))})
        elif op == "train":
            return train(req.get("spec") or {}, chan, req.get("id"))
        elif op == "exit":
            return 0
        else:
            chan.send({"t": "error", "id": req.get("id"), "message": f"unknown request {op!r}"})
    return 0


# ---- inspect -------------------------------------------------------------------------------------------
def inspect(script: Any, params: Any = None) -> dict[str, Any]:
    """``{"ok": True, "experiment": {...}}`` or ``{"ok": False, "error": ..., "path", "line", "detail"}``."""
    from lrviz.experiment import load_experiment

    try:
        exp = load_experiment(str(script))
        return {"ok": True, "experiment": describe_experiment(exp)}
    except LrvizError as exc:
        return _error(exc)
    except Exception as exc:  # noqa: BLE001 - a script's failure we could not place
        return _error(exc)


def _error(exc: BaseException) -> dict[str, Any]:
    cause = exc.__cause__ or exc
    detail = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    out = {"ok": False, "error": str(exc) or type(exc).__name__, "detail": detail, "type": type(exc).__name__}
    if isinstance(exc, ScriptError):
        out.update(path=exc.path, line=exc.line)
    return out


def describe_experiment(exp: Any) -> dict[str, Any]:
    """Everything the app shows about a script, as plain values (the app never imports it)."""
    mod = exp.module
    choices = getattr(mod, "PARAM_CHOICES", None)
    return {
        "path": str(exp.path), "name": exp.name, "source_hash": exp.source_hash,
        "defaults": dict(exp.defaults), "params": dict(exp.params), "doc": exp.doc,
        "accepts_batch_size": bool(exp.accepts_batch_size),
        "has_custom_optimizer": bool(exp.has_custom_optimizer),
        "has_probe": callable(getattr(mod, "probe", None)),
        "batch_size_default": _batch_size_default(mod) if exp.accepts_batch_size else None,
        "param_choices": {str(k): list(v) for k, v in choices.items()
                          if isinstance(v, (list, tuple)) and v} if isinstance(choices, dict) else {},
        "surfaces": surfaces_of(mod),
    }


def _batch_size_default(mod: Any) -> int | None:
    """The default of ``build_data(batch_size=...)`` when it is a whole number (what the app shows)."""
    import inspect as _inspect

    try:
        param = _inspect.signature(mod.build_data).parameters.get("batch_size")
    except (TypeError, ValueError):
        return None
    default = getattr(param, "default", None)
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def surfaces_of(mod: Any) -> dict[str, Any]:
    """The script's 2-D surfaces sampled on a grid: ``{"default": name, "by_name": {name: {...}}}``.

    Each entry has ``name``, ``xlim``, ``ylim``, ``minima``, ``start``, ``log_levels`` and ``xs``,
    ``ys``, ``z`` (``z[j][i] = fn(xs[i], ys[j])``); empty when the script has none (or no probe).
    """
    if not callable(getattr(mod, "probe", None)):
        return {}
    import torch

    found: dict[str, dict[str, Any]] = {}
    many = getattr(mod, "SURFACES", None)
    if isinstance(many, dict):
        found.update({str(k): v for k, v in many.items() if isinstance(v, dict)})
    one = getattr(mod, "SURFACE", None)
    default = None
    if isinstance(one, dict):
        default = next((k for k, v in found.items() if v is one), None) or "default"
        found.setdefault(default, one)
    out: dict[str, Any] = {}
    for key, s in found.items():
        if not callable(s.get("fn")):
            continue
        try:
            (x0, x1), (y0, y1) = s["xlim"], s["ylim"]
            xs = torch.linspace(float(x0), float(x1), SURFACE_GRID, dtype=torch.float64)
            ys = torch.linspace(float(y0), float(y1), SURFACE_GRID, dtype=torch.float64)
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            with torch.no_grad():
                z = s["fn"](xx, yy).detach().cpu().double().numpy()
        except Exception:  # noqa: BLE001 - a surface we cannot sample is left out
            continue
        out[key] = {
            "name": str(s.get("name") or key), "xlim": [float(x0), float(x1)], "ylim": [float(y0), float(y1)],
            "minima": [[float(a), float(b)] for a, b in s.get("minima") or []],
            "start": [float(v) for v in s["start"]] if s.get("start") is not None else None,
            "log_levels": bool(s.get("log_levels")), "xs": xs.tolist(), "ys": ys.tolist(),
            "z": [[v if math.isfinite(v) else None for v in row] for row in z.tolist()],
        }
    return {"default": default, "by_name": out} if out else {}


# ---- train ---------------------------------------------------------------------------------------------
def train(spec: dict[str, Any], chan: _Channel, req_id: Any = None) -> int:
    """Train the run ``spec`` describes, serving it live; the exit status of ``lrviz run``."""
    from lrviz.live.serve import build_engine, serving

    try:
        engine, store = build_engine(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which shows it
        chan.send({"t": "failed", "id": req_id, **_error(exc)})
        return 1
    _terminate_as_stopped(engine)
    # the parent learns the run's id before the first step, so it can mark the row if we crash
    engine.on_open.append(lambda run_id: chan.send({"t": "opened", "id": req_id, "run_id": run_id}))
    try:
        with serving(engine, store, listen=spec.get("listen")) as endpoint:
            chan.send({"t": "serving", "id": req_id, "conn": endpoint.info.to_dict()})
            engine.run()
        state = str(engine.state)
        ended = {"t": "ended", "id": req_id, "state": state, "run_id": engine.run_id}
        if engine.error is not None:  # also for a parent that could not attach before the run ended
            ended.update(error=str(engine.error), detail=engine.error_detail or "")
        chan.send(ended)
    finally:
        if store is not None:
            store.close()
    return {"finished": 0, "stopped": 0, "diverged": 2}.get(state, 1)


def _terminate_as_stopped(engine: Any) -> None:
    """On SIGTERM (the app's second try at stopping a run that did not answer): save what we have,
    mark the run stopped, and exit at once, whatever the training thread is doing."""

    def handler(signum: int, frame: Any) -> None:
        writer = getattr(engine, "_writer", None)
        store = getattr(engine, "store", None)
        try:
            if writer is not None:
                writer.flush()
            if store is not None and engine.run_id is not None:
                store.set_status(engine.run_id, "stopped",
                                 error="stopped: the training process did not answer and was terminated")
        except Exception:  # noqa: BLE001 - exiting matters more than the last records
            pass
        os._exit(TERMINATED)

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["describe_experiment", "inspect", "main", "train", "Path"]
