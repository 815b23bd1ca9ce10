"""Full-fidelity export of a run: ``metrics.csv``, ``run.json``, plots and a TensorBoard event file,
written atomically.

Files
-----
``metrics.csv``
    One row per step: ``step,epoch,time,lr,loss,grad_norm``, then ``lr_1, lr_2, ...`` for the
    extra parameter groups (``lr`` is group 0), then any other stored per-step column, then
    ``val_loss,val_accuracy``, then one column per extra scalar series (in name order). The
    validation and scalar columns are filled on the row of the step a point was taken at and empty
    elsewhere (a point whose step has no row, or a second point of a series at one step, gets a row
    of its own holding only ``step`` and those columns). A repeated column name is made unique as
    pandas reads it (``val_loss.1``); a name holding a comma or a quote is quoted. Floats are written
    in their shortest form that reads back to the very same value (``0.05`` stays ``0.05``;
    float32 columns such as ``grad_norm`` in their float32 shortest form); NaN is ``nan``,
    infinities ``inf`` and ``-inf`` (Python's ``float()``, NumPy and pandas read all of these).
``run.json``
    Pretty-printed JSON: ``format``, ``run`` (name, script, status, times, ``kind``...), ``config``,
    ``summary``, ``events`` (``{step, kind, data, time}``), ``validation``
    (``{step, epoch, loss, accuracy, time}``) and ``scalars`` (``{name: {step: [...], value: [...],
    time: [...]}}``). JSON has no NaN or infinity: non-finite floats are written as ``null``.
``loss.<fmt>``, ``lr.<fmt>``
    Plots of the training loss (raw and smoothed, with validation points) and of the learning
    rate, drawn by the app's renderer (PNG, SVG or PDF), which needs Qt: the CLI loads it when a plot
    is asked for and it registers itself (:func:`use_plot_renderer`); this module (the core) never
    imports Qt, not even by name.
``events.out.tfevents.*.lrviz`` (format ``tb``)
    The run for TensorBoard: its tags are the CSV's columns, plus the smoothed loss and the events
    as text (see :mod:`lrviz.tensorboard`; needs the ``tensorboard`` package).

Every file goes through :func:`atomic_write`: it is written under a temporary name in the same
folder and moved into place, so a failed or interrupted export never leaves a partial file.

Why ~800 lines in one module: the files of one run (CSV with its sparse columns, JSON, the plots through
the renderer) and the description of a plot that both the app and the files follow (:data:`PLOT_PANELS`,
:class:`FigureSpec`, the event markers' texts) are the one contract "an export is what was seen"; the
TensorBoard writer already lives apart (:mod:`lrviz.tensorboard`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from lrviz.errors import ConfigError
from lrviz.records import Event, ValPoint
from lrviz.store.codec import jsonable

__all__ = [
    "DEFAULT_SMOOTHING",
    "FORMATS",
    "IMAGE_FORMATS",
    "MARKED_EVENTS",
    "FigureSpec",
    "PLOT_PANELS",
    "PlotPanel",
    "plot_panel",
    "plot_panels",
    "Marker",
    "atomic_write",
    "column_names",
    "describe_run",
    "event_markers",
    "event_text",
    "format_number",
    "export_data",
    "export_engine",
    "export_run",
    "parse_formats",
    "run_record",
    "smoothing_label",
    "write_metrics_csv",
    "write_run_json",
]

log = logging.getLogger(__name__)

#: Every format :func:`export_run` writes, in the order files are written.
FORMATS = ("csv", "json", "png", "svg", "pdf", "tb")
#: The formats that are plots (drawn with Qt).
IMAGE_FORMATS = ("png", "svg", "pdf")
DEFAULT_FORMATS = ("png", "csv", "json")
_FORMAT_LIST = "png, svg, pdf, csv, json, tb"
#: The format version of ``run.json``.
RUN_JSON_FORMAT = "lrviz-run/1"

_BASE_COLUMNS = ("step", "epoch", "time", "lr", "loss", "grad_norm")
_CHUNK_ROWS = 100_000

Writer = Callable[[IO[bytes]], None]


# --------------------------------------------------------------------------- atomic writes


def _write_error(path: Path, exc: OSError) -> ConfigError:
    """A message a person can act on, for a file that cannot be written."""
    code = exc.errno
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
        why = "permission denied — choose another folder"
    elif code == errno.EROFS:
        why = "the file system is read-only — choose another folder"
    elif code == errno.ENOSPC:
        why = "no space left on the device — free some space or choose another folder"
    elif isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        why = f"the folder {path.parent} does not exist — create it or choose another folder"
    elif isinstance(exc, NotADirectoryError) or code == errno.ENOTDIR:
        why = f"{path.parent} is not a folder — choose another folder"
    elif isinstance(exc, IsADirectoryError) or code == errno.EISDIR:
        why = "it is a folder — give a file name"
    else:
        why = f"{exc.strerror or exc} — choose another folder"
    return ConfigError(f"cannot write {path}: {why}")


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Writer, *, mode: int = 0o666,
                 durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that the file is either complete or untouched.

    ``data`` is bytes, text (written as UTF-8), or a function that writes into the binary file
    object it is given. The content goes to a temporary file in the same folder, is flushed to
    disk, and replaces ``path`` in one ``os.replace``; on any failure the temporary file is
    removed and an existing ``path`` is left as it was. A path that cannot be written (no
    permission, missing folder, read-only or full disk) raises :class:`ConfigError` naming it;
    other exceptions raised by a writer function propagate unchanged. Returns ``path``.
    ``mode``: the new file's permissions (with the umask; 0o600 for a file only you may read);
    ``durable=False`` skips the fsync (a checkpoint rewritten often, not worth a disk flush each).
    """
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"cannot write {target}: it is a folder — give a file name")
    payload: bytes | None
    if isinstance(data, str):
        payload = data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        payload = bytes(data)
    elif callable(data):
        payload = None
    else:
        raise TypeError(f"atomic_write needs bytes, str or a writer function, not {type(data).__name__}")

    tmp: Path | None = None
    try:
        for _ in range(100):
            candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            try:
                # 0o666 (the default) and the process umask: the same mode as a file written with open().
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
            except FileExistsError:
                continue
            tmp = candidate
            break
        else:  # pragma: no cover - 100 random name collisions
            raise ConfigError(f"cannot write {target}: no free temporary file name in {target.parent}")
        with os.fdopen(fd, "wb") as fh:
            if payload is not None:
                fh.write(payload)
            else:
                data(fh)  # type: ignore[operator]
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise _write_error(target, exc) from exc
    finally:
        if tmp is not None:
            try:
                tmp.unlink()
            except OSError as exc:  # pragma: no cover - nothing more to do
                log.warning("could not remove the temporary file %s: %s", tmp, exc)
    log.debug("wrote %s", target)
    return target


# --------------------------------------------------------------------------- CSV


def _format_column(values: np.ndarray) -> list[str]:
    """Each value as the shortest text that reads back to the same value (``nan``/``inf``)."""
    a = np.asarray(values)
    kind = a.dtype.kind
    if kind in "iub":
        return list(map(str, a.astype(np.int64).tolist())) if kind == "b" else list(map(str, a.tolist()))
    if kind != "f":
        return [str(v) for v in a.tolist()]
    if a.dtype.itemsize < 8:
        # NumPy's str() of float16/float32 is their own shortest round-trip form.
        return a.astype(str).tolist()
    # Repeated values (learning rates, epochs padded as floats) are formatted once each.
    sample = a[:4096]
    if a.size > 8192 and np.unique(sample).size * 4 <= sample.size:
        uniques, inverse = np.unique(a, return_inverse=True)
        texts = np.array(list(map(repr, uniques.tolist())), dtype=object)
        return texts[inverse.ravel()].tolist()
    return list(map(repr, a.astype(np.float64, copy=False).tolist()))


def _val_text(value: float | None) -> str:
    if value is None:
        return ""
    return repr(float(value))


def _as_2d(arr: np.ndarray, n: int) -> np.ndarray:
    """``arr`` as (n, k): a column becomes (n, 1), further axes are flattened."""
    if arr.ndim == 1:
        return arr.reshape(-1, 1)
    if arr.ndim == 2:
        return arr
    return arr.reshape(n, int(np.prod(arr.shape[1:])))


def _step_columns(steps: Mapping[str, np.ndarray]) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """(header names, 1-D columns, step array) from a ``StepBuffer.view()``-like dict."""
    lengths = {k: len(v) for k, v in steps.items() if np.ndim(v) >= 1}
    n = max(lengths.values(), default=0)
    for name, length in lengths.items():
        if length != n:
            raise ConfigError(f"step column {name!r} has {length} rows, others {n}; cannot export it")
    step = np.asarray(steps["step"]) if "step" in steps else np.arange(n, dtype=np.int64)
    lr = np.asarray(steps["lr"]) if "lr" in steps else np.full((n, 1), np.nan)
    lr = _as_2d(lr, n)
    nan = np.full(n, np.nan)

    def col(name: str) -> np.ndarray:
        return np.asarray(steps[name]) if name in steps else nan

    names = list(_BASE_COLUMNS)
    cols = [step, col("epoch"), col("time"), lr[:, 0] if lr.shape[1] else nan, col("loss"), col("grad_norm")]
    for g in range(1, lr.shape[1]):
        names.append(f"lr_{g}")
        cols.append(lr[:, g])
    for name in sorted(set(steps) - set(_BASE_COLUMNS)):  # columns a newer writer may store
        arr = np.asarray(steps[name])
        if arr.ndim == 1:
            names.append(name)
            cols.append(arr)
        else:
            flat = _as_2d(arr, n)
            for j in range(flat.shape[1]):
                names.append(f"{name}_{j}")
                cols.append(flat[:, j])
    return names, cols, step


class _SparseColumns:
    """CSV columns that hold values at some steps only (validation, extra scalars).

    Each point goes on the row of its step; a point whose step has no row, or a second point of a
    series at one step, goes on a row of its own (``step`` and the sparse columns only), after the
    row of that step. Points of several series at one such step share that row.
    """

    def __init__(self, step: np.ndarray):
        self.step = step
        self.names: list[str] = []
        #: per series: (rows, one text list per column of the series), rows increasing
        self.groups: list[tuple[np.ndarray, list[list[str]], int]] = []
        self.extra: dict[tuple[int, int], dict[int, str]] = {}  # (step, k-th at it) -> column -> text

    def add(self, names: Sequence[str], steps: Sequence[int] | np.ndarray, texts: Sequence[Sequence[str]]) -> None:
        """A series of points at ``steps`` (in step order) with the text of each of its columns."""
        first = len(self.names)
        self.names.extend(names)
        ps = np.asarray(steps, dtype=np.int64).reshape(-1)
        n = len(self.step)
        rows = np.searchsorted(self.step, ps)
        on_row = np.zeros(len(ps), bool)
        if n:
            on_row = (rows < n) & (self.step[np.minimum(rows, n - 1)] == ps)
        idx = np.flatnonzero(on_row)
        _, firsts = np.unique(rows[idx], return_index=True)  # the first point of the series at each row
        placed = idx[np.sort(firsts)]
        self.groups.append((rows[placed], [[col[i] for i in placed.tolist()] for col in texts], first))
        rest = np.ones(len(ps), bool)
        rest[placed] = False
        seen: dict[int, int] = {}
        for i in np.flatnonzero(rest).tolist():
            s = int(ps[i])
            k = seen.get(s, 0)
            seen[s] = k + 1
            cells = self.extra.setdefault((s, k), {})
            for j, col in enumerate(texts):
                cells[first + j] = col[i]

    def cells(self, lo: int, hi: int) -> list[list[str]]:
        """The text of every sparse column on rows ``lo:hi``."""
        out = [[""] * (hi - lo) for _ in self.names]
        for rows, texts, first in self.groups:
            i0, i1 = np.searchsorted(rows, [lo, hi])
            for j, col in enumerate(texts):
                cells = out[first + j]
                for r, text in zip(rows[i0:i1].tolist(), col[i0:i1]):
                    cells[r - lo] = text
        return out

    def extra_lines(self, n_train: int) -> list[tuple[int, str]]:
        """(step, line) of the rows of their own, in step order."""
        empty_train = "," * (n_train - 1)
        return [(s, f"{s}{empty_train}" + "".join("," + cells.get(j, "") for j in range(len(self.names))))
                for (s, _), cells in sorted(self.extra.items())]


def _csv_field(text: str) -> str:
    """``text`` as one CSV field: quoted (quotes doubled) when it holds a comma, a quote or a line break."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _unique(names: list[str]) -> list[str]:
    """Column names made unique the way pandas reads repeats: ``val_loss``, ``val_loss.1``..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else f"{name}.{k}")
    return out


def column_names(step_names: Sequence[str], scalar_names: Iterable[str]) -> list[str]:
    """The header of ``metrics.csv``: the step columns, ``val_loss``, ``val_accuracy``, then the extra
    scalar series in name order, a repeated name made unique as pandas reads it (``loss.1``)."""
    return _unique([*step_names, "val_loss", "val_accuracy", *sorted(scalar_names)])


def write_metrics_csv(
    path: str | os.PathLike[str],
    steps: Mapping[str, np.ndarray],
    validation: Sequence[ValPoint] = (),
    scalars: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> Path:
    """Write the per-step series, validation points and extra scalar series as ``metrics.csv`` (see the
    module docstring).

    ``steps`` is a dict like ``StepBuffer.view()`` or ``RunStore.load_steps()``: ``step`` (int64),
    ``epoch``, ``time``, ``loss``, ``grad_norm`` and ``lr`` of shape (n, groups), with steps in
    increasing order. ``scalars`` is like ``RunStore.load_scalars()``: name -> (steps, values, ...), in
    step order; each is a column, empty where it was not logged. Written atomically; returns ``path``.
    """
    names, cols, step = _step_columns(steps)
    n = len(step)
    sparse = _SparseColumns(step)
    sparse.add(["val_loss", "val_accuracy"], [int(p.step) for p in validation],
               [[_val_text(p.loss) for p in validation], [_val_text(p.accuracy) for p in validation]])
    for name, series in sorted((scalars or {}).items()):
        sparse.add([name], series[0], [_format_column(np.asarray(series[1], dtype=np.float64))])
    header = ",".join(map(_csv_field, column_names(names, scalars or {}))) + "\n"
    extra = sparse.extra_lines(len(names))

    def write(fh: IO[bytes]) -> None:
        fh.write(header.encode("utf-8"))
        pending = 0  # next index in `extra`
        for lo in range(0, n, _CHUNK_ROWS):
            hi = min(n, lo + _CHUNK_ROWS)
            texts = [_format_column(c[lo:hi]) for c in cols]
            lines = list(map(",".join, zip(*texts, *sparse.cells(lo, hi))))
            last_step = int(step[hi - 1])
            inserts = []
            while pending < len(extra) and (extra[pending][0] <= last_step or hi == n):
                inserts.append(extra[pending])
                pending += 1
            if inserts:
                chunk_steps = step[lo:hi]
                for s, line in reversed(inserts):  # from the end, so positions stay valid
                    lines.insert(int(np.searchsorted(chunk_steps, s, side="right")), line)
            fh.write(("\n".join(lines) + "\n").encode("utf-8"))
        for _, line in extra[pending:]:  # only when there are no step rows at all
            fh.write((line + "\n").encode("utf-8"))

    return atomic_write(path, write)


# --------------------------------------------------------------------------- JSON


def _json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON types: non-finite floats become None, NumPy values Python ones."""
    return jsonable(obj, nonfinite="null")


def write_run_json(
    path: str | os.PathLike[str],
    *,
    run: Mapping[str, Any],
    config: Mapping[str, Any],
    events: Iterable[Event],
    validation: Iterable[ValPoint],
    summary: Mapping[str, Any],
    scalars: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> Path:
    """Write ``run.json``: the run, its config, summary, events, validation points and extra scalar
    series (``{name: {"step": [...], "value": [...], "time": [...]}}``, ``time`` when given).

    Pretty-printed (indent 2, keys in the order given). Non-finite floats are written as
    ``null``; NumPy values, tuples and paths as their plain JSON form. Written atomically.
    """
    doc = {
        "format": RUN_JSON_FORMAT,
        "run": dict(run),
        "config": dict(config),
        "summary": dict(summary),
        "events": [{"step": e.step, "kind": e.kind, "data": e.data or {}, "time": e.time} for e in events],
        "validation": [
            {"step": p.step, "epoch": p.epoch, "loss": p.loss, "accuracy": p.accuracy, "time": p.time}
            for p in validation
        ],
        "scalars": {
            name: dict(zip(("step", "value", "time"), (np.asarray(a).tolist() for a in series)))
            for name, series in sorted((scalars or {}).items())
        },
    }
    text = json.dumps(_json_safe(doc), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write(path, text)


# --------------------------------------------------------------------------- whole runs


def parse_formats(formats: str | Iterable[str] | None) -> tuple[str, ...]:
    """Formats from ``"png,svg"`` or a list: lower-cased, without dots or repeats.

    An unknown one raises :class:`ConfigError` listing the known ones.
    """
    if formats is None:
        return DEFAULT_FORMATS
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in items:
        fmt = str(item).strip().lower().lstrip(".")
        if not fmt:
            continue
        if fmt not in FORMATS:
            raise ConfigError(f"unknown export format {str(item).strip()!r}; choose from {_FORMAT_LIST}")
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise ConfigError(f"no export format given; choose from {_FORMAT_LIST}")
    return tuple(out)


def _local_iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def run_record(info: Any) -> dict[str, Any]:
    """The ``run`` part of ``run.json`` from a ``RunInfo`` (times as epoch seconds and local ISO text)."""
    started, ended = info.started_at, info.ended_at
    return {
        "id": info.id,
        "name": info.name,
        "script": Path(info.script_path).name,
        "script_path": info.script_path,
        "script_hash": info.script_hash,
        "device": info.device,
        "status": info.status,
        "created_at": info.created_at,
        "started_at": started,
        "ended_at": ended,
        "started": _local_iso(started),
        "ended": _local_iso(ended),
        "duration_s": (ended - started) if started is not None and ended is not None else None,
        "steps": info.steps,
        "best_loss": info.best_loss,
        "final_loss": info.final_loss,
        "error": info.error,
        "parent_id": info.parent_id,
        "fork_step": info.fork_step,
        "kind": getattr(info, "kind", "lrviz"),
    }


def describe_run(run: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """A one-line plot title: run name, script and the main settings.

    For example ``"mnist_mlp #3 — mnist_mlp.py · sgd lr=0.1 momentum=0.9 · CosineAnnealingLR:T_max=1000"``.
    """
    parts: list[str] = []
    name = str(run.get("name") or "").strip()
    script = Path(str(run.get("script_path") or run.get("script") or "")).name
    head = " — ".join(p for p in (name, script) if p)
    if head:
        parts.append(head)
    settings: list[str] = []
    if config.get("optimizer"):
        settings.append(str(config["optimizer"]))
    if config.get("lr") is not None:
        settings.append(f"lr={_short(config['lr'])}")
    for key, label in (("momentum", "momentum"), ("weight_decay", "wd")):
        value = config.get(key)
        if value not in (None, 0, 0.0):
            settings.append(f"{label}={_short(value)}")
    if config.get("batch_size"):
        settings.append(f"batch={config['batch_size']}")
    if settings:
        parts.append(" ".join(settings))
    if config.get("schedule"):
        parts.append(str(config["schedule"]))
    return " · ".join(parts)


# --------------------------------------------------------------------------- the figure description

#: Events a plot marks (a line across the plots, a label above them), in the app and in exported files.
MARKED_EVENTS = ("set_lr", "set_schedule", "set_hyperparams", "set_clip", "lr_reduced", "pause", "diverged", "error",
                 "stop", "rejected", "rollback", "early_stop", "range_test")
#: Marked events drawn in the alarm colour.
ALARM_EVENTS = ("diverged", "error")
#: A pause this close (in steps) after the last marked pause is not marked: single-stepping pauses every step.
PAUSE_GAP = 20
#: The loss smoothing the app starts with: TensorBoard's weight of a debiased exponential moving average.
DEFAULT_SMOOTHING = 0.6


@dataclass
class Marker:
    """The mark of the events at one step: their short labels, in order, without repeats."""

    step: int
    kinds: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " · ".join(self.texts)

    @property
    def alarm(self) -> bool:
        return any(k in ALARM_EVENTS for k in self.kinds)


@dataclass(frozen=True)
class PlotPanel:
    """One panel of the run plots, the same on screen and in files: ``key`` (as in
    :attr:`FigureSpec.panels`), the y-axis ``title`` and ``short`` forms of it for a short panel, its
    share of the height (``stretch``) and, for a panel that draws one per-step column as it is
    (``grad``), that ``column``; a panel without one is drawn by code of its own (loss, rates, accuracy)."""

    key: str
    title: str
    short: tuple[str, ...] = ()
    stretch: int = 3
    column: str | None = None


#: The panels of the run plots, top to bottom. The app's live plots (ui/plots.py) and the exported
#: figures (ui/render.py) both lay out their panels from this table, and both draw a panel with a
#: ``column`` from its entry alone: a new plot of a recorded per-step column is one entry here.
PLOT_PANELS: tuple[PlotPanel, ...] = (
    PlotPanel("loss", "loss", stretch=5),
    PlotPanel("lr", "learning rate", ("LR",)),
    PlotPanel("grad", "gradient norm (L2)", ("grad norm",), column="grad_norm"),
    PlotPanel("acc", "val accuracy (%)", ("val acc %", "acc %")),
)


def plot_panels() -> tuple[PlotPanel, ...]:
    """:data:`PLOT_PANELS`, as it is now (what the screen and the export read when they lay out)."""
    return PLOT_PANELS


def plot_panel(key: str) -> PlotPanel:
    """The entry of :data:`PLOT_PANELS` for ``key`` (KeyError when there is none)."""
    for panel in PLOT_PANELS:
        if panel.key == key:
            return panel
    raise KeyError(key)


@dataclass
class FigureSpec:
    """What a plot of runs shows: one description for the app's live plots and the files exported.

    The app fills it from what is on screen (smoothing slider, log-axis boxes, the steps in view)
    and hands it to the renderer, so the exported plot is what was seen; headless exports use the
    app's defaults. ``log_loss`` None chooses a log axis when the losses are positive and span a
    factor of 50 or more. ``panels`` (keys of :data:`PLOT_PANELS`) are drawn top to bottom, sharing
    the step axis: ``loss``, ``lr``, ``grad`` (gradient norm), ``acc`` (validation accuracy, when recorded).
    """

    title: str = ""
    smoothing: float = DEFAULT_SMOOTHING
    log_loss: bool | None = None
    log_lr: bool = True
    log_grad: bool = False
    panels: tuple[str, ...] = ("loss", "lr")
    x_range: tuple[float, float] | None = None


def format_number(x: Any, digits: int = 3) -> str:
    """``0.01``, ``3e-4``, ``1.25``: a number short and exact enough for a label (``nan``, ``inf`` as such)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    text = f"{v:.{digits}g}"
    if "e" in text:
        mant, exp = text.split("e")
        return f"{mant}e{int(exp)}"
    return text


def event_text(event: Event) -> str:
    """The short label of a marked event: ``lr 3e-4``, ``CosineAnnealingLR``, ``paused``, ``diverged``..."""
    d = event.data or {}
    k = event.kind
    if k == "set_lr":
        return f"lr {format_number(d.get('lr', math.nan))}"
    if k == "set_schedule":
        spec = d.get("spec")
        return "no schedule" if not spec else str(spec).split(":")[0].split("+")[0] + (
            "+…" if "+" in str(spec) else "")
    if k == "set_hyperparams":
        parts = [f"{'wd' if key == 'weight_decay' else key} {format_number(v)}" for key, v in d.items()
                 if key in ("momentum", "weight_decay") and v is not None]
        return ", ".join(parts) or "hyperparams"
    if k == "set_clip":
        clip = d.get("clip_grad_norm")
        return "no clipping" if clip is None else f"clip {format_number(clip)}"
    if k == "lr_reduced":
        return f"plateau: lr {format_number(d.get('lr', math.nan))}"
    return {"pause": "paused", "stop": "stopped", "early_stop": "early stop", "range_test": "range test",
            "rejected": f"rejected {d.get('kind', '')}".strip()}.get(k, k)


def event_markers(events: Iterable[Event]) -> list[Marker]:
    """The markers a plot of a run draws, by step: the :data:`MARKED_EVENTS`, several at one step
    sharing a marker, a pause within :data:`PAUSE_GAP` steps after the last marked one left out."""
    markers: dict[int, Marker] = {}
    last_pause: int | None = None
    for e in events:
        if e.kind not in MARKED_EVENTS:
            continue
        step = int(e.step)
        if e.kind == "pause":
            if last_pause is not None and step - last_pause < PAUSE_GAP:
                continue
            last_pause = step
        m = markers.setdefault(step, Marker(step))
        text = event_text(e)
        m.kinds.append(e.kind)
        if text not in m.texts:
            m.texts.append(text)
    return sorted(markers.values(), key=lambda m: m.step)


def smoothing_label(weight: float) -> str:
    """The legend entry of the smoothed loss: ``smoothed (0.60)``, or ``smoothed (off)``."""
    return f"smoothed ({weight:.2f})" if weight > 0 else "smoothed (off)"


def _short(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


#: What draws plots (the ``plots`` plugin, see :mod:`lrviz.plugins`, which registers itself when loaded):
#: the core never imports the Qt layer, not even by name.
_plot_renderer: Any = None


def use_plot_renderer(renderer: Any) -> None:
    """Register what draws plot exports: an object with ``RunData`` and ``render_run`` (the plots plugin)."""
    global _plot_renderer
    _plot_renderer = renderer


def _load_render() -> Any:
    if _plot_renderer is None:
        raise ConfigError(
            "plot export needs the app's renderer (PySide6 and pyqtgraph; the lrviz command loads it when it "
            "draws, or lrviz.plugins.load_plugin('plots') first); export only csv and json (--format csv,json) without it")
    return _plot_renderer


def export_data(
    out_dir: str | os.PathLike[str],
    *,
    run: Mapping[str, Any],
    config: Mapping[str, Any],
    steps: Mapping[str, np.ndarray],
    events: Sequence[Event],
    validation: Sequence[ValPoint],
    summary: Mapping[str, Any],
    formats: str | Iterable[str] | None = DEFAULT_FORMATS,
    title: str | None = None,
    scalars: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> list[Path]:
    """Write the export files of one run held in memory into ``out_dir`` (created when missing).

    ``csv`` writes ``metrics.csv``, ``json`` ``run.json``, each image format ``loss.<fmt>``
    and ``lr.<fmt>``, and ``tb`` a TensorBoard event file (:mod:`lrviz.tensorboard`). ``title``
    defaults to :func:`describe_run`. Formats are checked, and Qt and TensorBoard imported, before
    anything is written. Returns the paths written, in that order.
    """
    fmts = parse_formats(formats)
    images = [f for f in fmts if f in IMAGE_FORMATS]
    render = _load_render() if images else None
    if "tb" in fmts:
        from lrviz import tensorboard

        tensorboard.require()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(out, exc) from exc
    written: list[Path] = []
    if "csv" in fmts:
        written.append(write_metrics_csv(out / "metrics.csv", steps, validation, scalars))
    if "json" in fmts:
        written.append(
            write_run_json(out / "run.json", run=run, config=config, events=events, validation=validation,
                           summary=summary, scalars=scalars)
        )
    if render is not None:
        label = str(run.get("name") or Path(str(run.get("script_path") or "run")).stem)
        data = render.RunData(label=label, steps=steps, events=list(events), validation=list(validation))
        text = describe_run(run, config) if title is None else title
        for fmt in images:
            for kind in ("loss", "lr"):
                written.append(render.render_run(data, out / f"{kind}.{fmt}", fmt, title=text, kind=kind))
    if "tb" in fmts:
        written.append(tensorboard.write_events(out, run=run, steps=steps, events=events, validation=validation,
                                                scalars=scalars))
    log.info("exported %s to %s", ", ".join(p.name for p in written), out)
    return written


def export_run(
    store: Any,
    run_ref: int | str,
    out_dir: str | os.PathLike[str],
    formats: str | Iterable[str] | None = DEFAULT_FORMATS,
    title: str | None = None,
) -> list[Path]:
    """Export a stored run (by id or name) into ``out_dir``; the paths written.

    Formats: any of png, svg, pdf, csv, json, tb (a list or ``"png,csv"``). Raises
    :class:`ConfigError` for an unknown format, a folder that cannot be written, a plot
    format when Qt cannot be imported, or ``tb`` without the tensorboard package;
    :class:`~lrviz.errors.StoreError` for an unknown run.
    """
    fmts = parse_formats(formats)
    if any(f in IMAGE_FORMATS for f in fmts):
        _load_render()  # fail before reading the run
    if "tb" in fmts:
        from lrviz import tensorboard

        tensorboard.require()
    info = store.get_run(run_ref)
    return export_data(
        out_dir,
        run=run_record(info),
        config=info.config,
        steps=store.load_steps(info.id),
        events=store.load_events(info.id),
        validation=store.load_validation(info.id),
        summary=info.summary,
        formats=fmts,
        title=title,
        scalars=store.load_scalars(info.id, times=True),
    )


def export_engine(
    engine: Any,
    out_dir: str | os.PathLike[str],
    formats: str | Iterable[str] | None = DEFAULT_FORMATS,
    title: str | None = None,
) -> list[Path]:
    """Export a ``TrainingEngine``'s run from memory (for ``lrviz run --out DIR`` without a store).

    With a store, ``export_run(store, engine.run_id, ...)`` writes the same files.
    """
    exp = engine.experiment
    config = engine.config.to_dict() if hasattr(engine.config, "to_dict") else dict(engine.config)
    steps = engine.buffer.view() if engine.buffer is not None else {}
    summary = engine.summary()
    run = {
        "id": engine.run_id,
        "name": getattr(engine, "name", None) or Path(str(exp.path)).stem,
        "script": Path(str(exp.path)).name,
        "script_path": str(exp.path),
        "script_hash": getattr(exp, "source_hash", None),
        "device": str(engine.device),
        "status": engine.state,
        "steps": summary.get("steps"),
        "best_loss": summary.get("best_loss"),
        "final_loss": summary.get("final_loss"),
        "error": str(engine.error) if engine.error is not None else None,
    }
    return export_data(
        out_dir,
        run=run,
        config=config,
        steps=steps,
        events=list(engine.events),
        validation=list(engine.validation),
        summary=summary,
        formats=formats,
        title=title,
    )
