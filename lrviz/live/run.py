"""One ``Run`` interface for whoever watches and steers a run: the app, ``lrviz steer``, tests.

:class:`RemoteRun` follows a run in another process through its live endpoint; :class:`LocalRun`
wraps an engine in this process (fast unit tests, and anything that must not cross a process).
Both offer the same read-only records (a :class:`~lrviz.records.StepBuffer`, events, validation
points, lab data), the same state fields, and the same commands, each returning a Future of its
ack (the step it takes effect at) or of its rejection (:class:`CommandRejected` with the reason).
Nothing here imports torch or Qt.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from lrviz.control import Steering
from lrviz.records import Event, StepBuffer, ValPoint
from lrviz.states import Command, RunState, is_terminal

from .client import CommandRejected, LiveClient, NotLive
from .connection import ConnectionInfo
from .protocol import MOVING

__all__ = ["CommandRejected", "LocalRun", "NotLive", "RemoteRun", "Run"]


class Run(Steering):
    """What every run offers its watchers. Fields are plain attributes, read from any thread."""

    run_id: int | None = None
    name: str = ""
    script_path: str = ""
    config: dict[str, Any]
    state: str = RunState.IDLE
    step: int = 0
    epoch: int = 0
    total_steps: int | None = None
    lrs: list[float]
    device: str | None = None
    error: str | None = None
    error_detail: str = ""
    detection: dict[str, Any] | None = None
    pause_requested: bool = False
    buffer: StepBuffer | None = None
    events: list[Event]
    validation: list[ValPoint]
    probe_steps: list[int]
    probe_values: dict[str, list[float]]
    range_test_progress: list[tuple[float, float]]
    #: The last range test's result as plain values (suggestions, lrs, losses, smoothed), once it ended.
    range_test_result: dict[str, Any] | None = None
    done: threading.Event

    # ---- commands (the Steering methods call this) ----------------------------------------------------
    def command(self, kind: str, **data: Any) -> Future:
        """Ask the run for ``kind`` (a :class:`lrviz.states.Command`); a Future of the ack."""
        raise NotImplementedError

    def range_test(self, **kwargs: Any) -> Future:
        """Run the LR range test on the run's current weights; the ack's ``data["result"]`` holds it."""
        fut = self.command(Command.RANGE_TEST, **kwargs)

        def keep(f: Future) -> None:
            if f.exception() is None:
                self.range_test_result = (f.result().get("data") or {}).get("result")

        fut.add_done_callback(keep)
        return fut

    # ---- reading --------------------------------------------------------------------------------------
    @property
    def is_terminal(self) -> bool:
        return is_terminal(self.state)

    def layers(self) -> dict[str, Any] | None:
        """Per-layer statistics (``step``, ``names``, ``grad_norm``, ``weight_norm``, ``update_ratio``)."""
        return None

    def summary(self) -> dict[str, Any]:
        """Figures of the run so far (steps, best/final loss, best/final validation loss)."""
        return summarize(self.buffer, self.validation, self.step, str(self.state))

    def close(self) -> None:
        """Stop watching (the run itself goes on)."""


def summarize(buffer: StepBuffer | None, validation: list[ValPoint], step: int, state: str) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": step, "state": state}
    if buffer is not None and len(buffer):
        loss = buffer.view()["loss"]
        finite = loss[np.isfinite(loss)]
        out["final_loss"] = float(loss[-1])
        out["best_loss"] = float(finite.min()) if finite.size else None
    if validation:
        vals = [p.loss for p in validation if math.isfinite(p.loss)]
        out["final_val_loss"] = validation[-1].loss
        out["best_val_loss"] = min(vals) if vals else None
    return out


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


class LocalRun(Run):
    """A run trained by an engine in this process (its records are the engine's own)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.done = engine.done
        self.config = engine.config.to_dict()
        self.script_path = str(engine.experiment.path)
        self.name = engine.name or engine.experiment.name

    @property
    def state(self) -> str:  # type: ignore[override]
        return str(self.engine.state)

    @property
    def error(self) -> str | None:  # type: ignore[override]
        return _text_or_none(self.engine.error)

    @property
    def detection(self) -> dict[str, Any] | None:  # type: ignore[override]
        det = self.engine.detection
        return det.to_dict() if det is not None else None

    @property
    def pause_requested(self) -> bool:  # type: ignore[override]
        return bool(self.engine._pause_requested)

    @property
    def device(self) -> str | None:  # type: ignore[override]
        return _text_or_none(self.engine.device)

    def command(self, kind: str, **data: Any) -> Future:
        return _rejections_as(self.engine.submit(str(kind), data))

    def layers(self) -> dict[str, Any] | None:
        probe = self.engine.layer_probe
        return probe.as_arrays() if probe is not None else None

    def summary(self) -> dict[str, Any]:
        return self.engine.summary()


def _engine_field(name: str) -> property:
    return property(lambda self: getattr(self.engine, name), doc=f"The engine's ``{name}``, now.")


# Read through to the engine. Properties, not __getattr__: Run's class defaults (step = 0, buffer =
# None...) would be found first, and a LocalRun would never show the engine's values.
for _name in ("run_id", "step", "epoch", "total_steps", "lrs", "error_detail", "buffer", "events", "validation",
              "probe_steps", "probe_values", "range_test_progress"):
    setattr(LocalRun, _name, _engine_field(_name))


def _rejections_as(fut: Future) -> Future:
    """The same Future, but an engine's refusal arrives as CommandRejected (like a remote one)."""
    out: Future = Future()

    def done(f: Future) -> None:
        exc = f.exception()
        if exc is None:
            out.set_result(f.result())
        elif isinstance(exc, CommandRejected):
            out.set_exception(exc)
        else:
            err = CommandRejected(str(exc))
            err.__cause__ = exc
            out.set_exception(err)

    fut.add_done_callback(done)
    return out


class RemoteRun(Run):
    """A run in another process, followed through its live endpoint.

    ``connect()`` attaches and receives the whole history (from row ``since_row``), then everything
    live. ``done`` is set when the run's end arrived or the connection was lost (``lost`` then says
    why). ``ring`` (default: on a Unix socket) reads the rows from the run's shared-memory ring.
    """

    def __init__(self, info: ConnectionInfo, *, name: str = "app", since_row: int = 0, ring: bool | None = None):
        self.info = info
        self.config = {}
        self.lrs = []
        self.events = []
        self.validation = []
        self.acks: list[dict[str, Any]] = []
        self.probe_steps = []
        self.probe_values = {}
        self.range_test_progress = []
        self.range_test_result: dict[str, Any] | None = None
        self.summary_at_end: dict[str, Any] | None = None
        self.describe: dict[str, Any] = {}
        self.lost: str | None = None
        self.done = threading.Event()
        self.changed = threading.Event()
        self._layers: dict[str, Any] | None = None
        self._next_row = since_row
        self.client = LiveClient(info, name=name, on_message=self._on_message, since_row=since_row, ring=ring)

    def connect(self, timeout: float = 5.0) -> RemoteRun:
        """Attach; NotLive when the run cannot be reached or refuses the token."""
        self.client.connect(timeout)
        w = self.client.welcome
        self.describe = w.get("run") or {}
        d = self.describe
        self.name = str(d.get("name") or "")
        self.script_path = str(d.get("script_path") or "")
        self.config = dict(d.get("config") or {})
        self._apply_state(w.get("state") or {})
        watcher = threading.Thread(target=self._watch, name="lrviz-live-watch", daemon=True)
        watcher.start()
        return self

    def command(self, kind: str, **data: Any) -> Future:
        return self.client.command(str(kind), data)

    def layers(self) -> dict[str, Any] | None:
        return self._layers

    def summary(self) -> dict[str, Any]:
        if self.summary_at_end is not None:
            return dict(self.summary_at_end)
        return super().summary()

    def close(self) -> None:
        self.client.close()

    # ---- messages -------------------------------------------------------------------------------------
    def _watch(self) -> None:
        self.client.closed.wait()
        if self.client.close_reason != "end":
            self.lost = self.client.close_reason
        self.done.set()
        self.changed.set()

    def _on_message(self, h: dict[str, Any], body: Any) -> None:
        t = h["t"]
        if t == "steps":
            self._on_steps(h, body)
        elif t == "events":
            self._extend(self.events, h, [Event(int(e["step"]), str(e["kind"]), dict(e.get("data") or {}),
                                                 float(e.get("time") or 0.0)) for e in h.get("items", ())])
        elif t == "val":
            self._extend(self.validation, h, [_val_point(p) for p in h.get("items", ())])
        elif t in ("state", "end"):
            self._apply_state(h)
            if t == "end":
                self.summary_at_end = h.get("summary")
        elif t == "ack":
            self.acks.append(h)
            if h.get("ok") and h.get("kind") == Command.RANGE_TEST:
                self.range_test_result = (h.get("data") or {}).get("result")
        elif t == "lab":
            self._on_lab(h)
        self.changed.set()

    def _on_steps(self, h: dict[str, Any], cols: dict[str, np.ndarray]) -> None:
        row = int(h.get("row", 0))
        buf = self.buffer
        if buf is None:
            lr = cols["lr"]
            groups = lr.shape[1] if lr.ndim == 2 else 1
            buf = StepBuffer(groups=groups, capacity=max(4096, 2 * len(cols["loss"])),
                             first_step=int(h.get("first_step", 0)) + row)
            self.buffer = buf
            self._next_row = row
        skip = self._next_row - row
        if skip > 0:  # rows we already have
            cols = {k: v[skip:] for k, v in cols.items()}
        buf.extend(cols)
        self._next_row = row + max(skip, 0) + len(cols["loss"])
        buf.seal()  # the history is kept compressed (in this reader thread, never the GUI's)
        self._apply_state({k: h[k] for k in MOVING if k in h})  # the step, once its row is here

    @staticmethod
    def _extend(target: list, h: dict[str, Any], items: list) -> None:
        start = int(h.get("start", len(target)))
        if start < len(target):
            items = items[len(target) - start:]
        target.extend(items)

    def _apply_state(self, s: dict[str, Any]) -> None:
        if "state" in s:
            self.state = RunState(s["state"]) if s["state"] in RunState._value2member_map_ else s["state"]
        for key in ("step", "epoch", "total_steps", "run_id", "device", "detection", "error"):
            if key in s:
                setattr(self, key, s[key])
        if "lrs" in s:
            self.lrs = [float(x) for x in s["lrs"]]
        if "error_detail" in s:
            self.error_detail = s["error_detail"] or ""
        if "pause_requested" in s:
            self.pause_requested = bool(s["pause_requested"])

    def _on_lab(self, h: dict[str, Any]) -> None:
        kind = h.get("kind")
        if kind == "probe":
            start = int(h.get("start", 0))
            skip = max(0, len(self.probe_steps) - start)
            steps = list(h.get("steps") or [])[skip:]
            for k, vals in (h.get("values") or {}).items():
                self.probe_values.setdefault(k, []).extend(float(v) for v in list(vals)[skip:])
            self.probe_steps.extend(int(s) for s in steps)
        elif kind == "range_test":
            if h.get("reset"):
                self.range_test_progress = []
                self.range_test_result = None
            self.range_test_progress.extend((float(a), float(b)) for a, b in h.get("points") or ())
        elif kind == "layers":
            self._on_layers(h)

    def _on_layers(self, h: dict[str, Any]) -> None:
        start = int(h.get("start", 0))
        names = list(h.get("names") or [])
        width = len(names)
        new = {"step": np.asarray(h.get("step") or [], np.int64)}
        for key in ("grad_norm", "weight_norm", "update_ratio"):
            new[key] = np.asarray(h.get(key) or np.zeros((0, width)), np.float64).reshape(-1, width)
        old = self._layers
        if old is None or start == 0:
            self._layers = {"names": names, **new}
            return
        self._layers = {"names": names, **{k: np.concatenate([old[k][:start], new[k]]) for k in new}}


def _val_point(p: dict[str, Any]) -> ValPoint:
    acc = p.get("accuracy")
    return ValPoint(int(p["step"]), int(p.get("epoch") or 0), float(p["loss"]),
                    None if acc is None else float(acc), float(p.get("time") or 0.0))
