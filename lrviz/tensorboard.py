"""TensorBoard both ways: a run written as an event file TensorBoard reads, and TensorBoard scalar
logs imported into the run store as read-only runs.

Everything goes through the ``tensorboard`` package (an optional extra: ``pip install
'lrviz[tensorboard]'``): its event file writer, its protocol buffers and its event file loader — never
``torch.utils.tensorboard`` (the app's process never imports torch), never a record format of our own.

Export (``lrviz export RUN --format tb``)
    One event file in the export folder, ``events.out.tfevents.<time>.<host>.<pid>.<n>.lrviz`` (an
    export again replaces it; other event files there are left alone). The tags are the columns of
    ``metrics.csv`` — ``loss``, ``lr`` (``lr_1``... for more parameter groups), ``grad_norm``,
    ``epoch``, ``val_loss``, ``val_accuracy`` and every extra scalar series under its own name — plus
    ``loss_smoothed``, the app's smoothing (:data:`lrviz.export.DEFAULT_SMOOTHING`: a debiased EMA,
    as TensorBoard's own smoothing slider, whose default is also 0.6). Values are TensorBoard's float32
    scalars (``simple_value``; its fast data server shows no other): each is the CSV's value rounded to
    float32, about 7 significant digits. Wall times are the run's start plus each step's ``time``. A
    column that holds no number at all is left out. The
    records are TensorBoard's own (its ``RecordWriter``), the file written as every export file is:
    complete or not at all.
    Events (interventions, pauses, divergence, roll-backs, checkpoints...) are text summaries under
    the tag ``events`` at their steps, one per step.

Import (``lrviz import DIR``)
    Every folder under DIR that holds event files is one run (TensorBoard's own notion of a run),
    stored read-only (kind ``imported``). One tag becomes the loss column (a guess, or ``--loss TAG``),
    the learning-rate tags the ``lr`` column (one per parameter group; a guess, or ``--lr TAG[,TAG]``),
    every other scalar tag an extra scalar series. Steps are stored as they are in the log (every 10th,
    say); a step logged twice keeps the value written last.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from lrviz.errors import ConfigError
from lrviz.records import Event, ValPoint

__all__ = [
    "EVENTS_TAG",
    "SMOOTHED_TAG",
    "Imported",
    "LogFolder",
    "guess_loss_tag",
    "guess_lr_tags",
    "import_logs",
    "read_folder",
    "require",
    "write_events",
]

log = logging.getLogger(__name__)

INSTALL = "pip install 'lrviz[tensorboard]' (or: pip install tensorboard)"
SMOOTHED_TAG = "loss_smoothed"
EVENTS_TAG = "events"
#: The end of the name of the event files lrviz writes (so that an export again replaces its own only).
FILE_SUFFIX = ".lrviz"
#: Rows per stored chunk of an imported run's steps.
IMPORT_CHUNK = 4096


def require() -> None:
    """Raise ConfigError, saying how to install it, when the ``tensorboard`` package is missing."""
    try:
        from tensorboard.compat.proto import event_pb2  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"TensorBoard export and import need the tensorboard package ({exc}); install it: "
                          f"{INSTALL}") from None


# --------------------------------------------------------------------------- export


class _Values:
    """Summary values of one event file: scalars as ``simple_value`` (float32: what torch's SummaryWriter
    writes, and the only scalar type every TensorBoard reader shows — its fast data server drops float64
    tensors), and text with the text plugin's metadata on each tag's first value (as TensorBoard's own
    writers do)."""

    def __init__(self) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata as text_metadata

        self._value = summary_pb2.Summary.Value
        self._tensor = tensor_pb2.TensorProto
        self._shape = tensor_shape_pb2.TensorShapeProto
        self._string = types_pb2.DT_STRING
        self._text_meta = text_metadata.create_summary_metadata(display_name=None, description=None)
        self._seen: set[str] = set()

    def scalar(self, tag: str, v: float) -> Any:
        return self._value(tag=tag, simple_value=v)

    def text(self, tag: str, text: str) -> Any:
        value = self._value(tag=tag, tensor=self._tensor(dtype=self._string, tensor_shape=self._shape(),
                                                         string_val=[text.encode("utf-8")]))
        if tag not in self._seen:
            self._seen.add(tag)
            value.metadata.CopyFrom(self._text_meta)
        return value


def _event_text(events: Sequence[Event]) -> str:
    """The events of one step as a Markdown list (TensorBoard's text dashboard renders it)."""
    lines = []
    for e in events:
        data = ", ".join(f"{k}={v}" for k, v in (e.data or {}).items())
        lines.append(f"- **{e.kind}**" + (f" {data}" if data else ""))
    return "\n".join(lines)


def write_events(
    out_dir: str | os.PathLike[str],
    *,
    run: Mapping[str, Any],
    steps: Mapping[str, np.ndarray],
    events: Sequence[Event] = (),
    validation: Sequence[ValPoint] = (),
    scalars: Mapping[str, Sequence[np.ndarray]] | None = None,
    smoothing: float | None = None,
) -> Path:
    """Write a run as one TensorBoard event file in ``out_dir`` (see the module docstring); its path.

    ``run`` is the ``run`` record of ``run.json`` (its ``started_at``/``created_at`` anchor the wall
    times); ``steps``, ``validation`` and ``scalars`` are what :func:`lrviz.export.write_metrics_csv`
    takes; ``smoothing`` that of ``loss_smoothed`` (default: the app's). Written atomically
    (:func:`lrviz.export.atomic_write`); an export again replaces the file of the one before.
    """
    require()
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    from lrviz.decimate import ema_debiased
    from lrviz.export import DEFAULT_SMOOTHING, _step_columns, _write_error, atomic_write, column_names

    names, cols, step = _step_columns(steps)
    scalars = dict(scalars or {})
    header = column_names(names, scalars)  # the tags are the CSV's columns
    k = len(names)
    val_loss_tag, val_acc_tag = header[k:k + 2]
    scalar_tags = dict(zip(sorted(scalars), header[k + 2:]))
    train = [(tag, np.asarray(col, dtype=np.float64)) for name, tag, col in zip(names, header, cols)
             if name not in ("step", "time")]
    if "loss" in steps and len(step):
        train.append((column_names([*header, SMOOTHED_TAG], [])[len(header)],  # unique, like the others
                      ema_debiased(np.asarray(steps["loss"], dtype=np.float64),
                                   DEFAULT_SMOOTHING if smoothing is None else smoothing)))
    train = [(tag, col) for tag, col in train if not np.isnan(col).all()]
    t0 = next((float(run[k]) for k in ("started_at", "created_at") if run.get(k) is not None), time.time())
    times = np.asarray(steps["time"], dtype=np.float64) if "time" in steps else np.zeros(len(step))
    wall = np.where(np.isfinite(times), t0 + times, t0)

    values = _Values()
    # Everything at a step that is not a training row: validation, scalars, events (step, order, time, values).
    sparse: list[tuple[int, int, float, list[Any]]] = []
    for p in validation:
        vals = [values.scalar(val_loss_tag, float(p.loss))]
        if p.accuracy is not None:
            vals.append(values.scalar(val_acc_tag, float(p.accuracy)))
        sparse.append((int(p.step), 0, t0 + float(p.time), vals))
    for name in sorted(scalars):
        series = scalars[name]
        when = series[2] if len(series) > 2 else np.zeros(len(series[0]))
        for s, v, t in zip(np.asarray(series[0]).tolist(), np.asarray(series[1], np.float64).tolist(),
                           np.asarray(when, np.float64).tolist()):
            sparse.append((s, 1, t0 + t if math.isfinite(t) else t0, [values.scalar(scalar_tags[name], v)]))
    by_step: dict[int, list[Event]] = {}
    for e in events:
        by_step.setdefault(int(e.step), []).append(e)
    for s, group in by_step.items():
        sparse.append((s, 2, t0 + float(group[0].time), [values.text(EVENTS_TAG, _event_text(group))]))
    sparse.sort(key=lambda item: (item[0], item[1]))

    def write(fh: IO[bytes]) -> None:
        records = RecordWriter(fh)
        header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2",
                                 source_metadata=event_pb2.SourceMetadata(writer="lrviz"))
        records.write(header.SerializeToString())

        def put(s: int, wall_time: float, vals: list[Any]) -> None:
            event = event_pb2.Event(step=s, wall_time=wall_time, summary=summary_pb2.Summary(value=vals))
            records.write(event.SerializeToString())

        # In step order across every tag: TensorBoard's readers take a step going back as a restarted run
        # and drop what came after it.
        j = 0
        columns = [col.tolist() for _, col in train]
        train_tags = [tag for tag, _ in train]
        for i, s in enumerate(step.tolist()):
            while j < len(sparse) and sparse[j][0] < s:
                put(sparse[j][0], sparse[j][2], sparse[j][3])
                j += 1
            if train_tags:
                put(s, float(wall[i]), [values.scalar(tag, col[i]) for tag, col in zip(train_tags, columns)])
        for item in sparse[j:]:
            put(item[0], item[2], item[3])

    out = Path(out_dir)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0{FILE_SUFFIX}"
    target = atomic_write(out / name, write)
    for old in out.glob(f"events.out.tfevents.*{FILE_SUFFIX}"):  # the previous export's file
        if old != target:
            try:
                old.unlink()
            except OSError as exc:
                raise _write_error(old, exc) from exc
    log.debug("wrote %s", target)
    return target


# --------------------------------------------------------------------------- import


@dataclass
class Series:
    """The points of one scalar tag: steps (int64), values and wall times (float64), in step order."""

    steps: np.ndarray
    values: np.ndarray
    times: np.ndarray


@dataclass
class LogFolder:
    """What one folder of event files holds (one TensorBoard run)."""

    folder: Path
    files: list[Path]
    scalars: dict[str, Series]
    other: dict[str, int] = field(default_factory=dict)
    """Tags that are not scalars, counted by what they are (``histograms``, ``images``, ``text``...)."""
    damage: str | None = None
    """Where the first damaged record is, when ``partial`` let the rest be read."""
    replaced: int = 0
    """Points dropped because a later one was written at the same step of the same tag."""


def _loader(path: Path) -> Any:
    """TensorBoard's event file loader, except that a damaged record is reported (``.damage``), not
    taken quietly as the end of the file."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat import tf

    class Checked(event_file_loader.EventFileLoader):
        def __init__(self, file_path: str):
            super().__init__(file_path)
            self.damage: str | None = None
            self.records = 0
            self._iterator = self._checked(self._iterator)

        def _checked(self, inner: Iterator[bytes]) -> Iterator[bytes]:
            while True:
                try:
                    record = next(inner)
                except StopIteration:
                    return
                except tf.errors.DataLossError as exc:
                    self.damage = f"record {self.records + 1}: {exc.message if hasattr(exc, 'message') else exc}"
                    return
                self.records += 1
                yield record

    return Checked(str(path))


def _event_files(path: Path) -> dict[Path, list[Path]]:
    """Folder -> its summary event files (oldest first), for every folder under ``path`` that has some."""
    from tensorboard.backend.event_processing import io_wrapper

    if path.is_file():
        return {path.parent: [path]} if io_wrapper.IsTensorFlowEventsFile(str(path)) else {}
    out = {}
    for folder in sorted(Path(p) for p in io_wrapper.GetLogdirSubdirectories(str(path))):
        files = sorted(f for f in folder.iterdir() if f.is_file() and io_wrapper.IsSummaryEventsFile(str(f)))
        if files:
            out[folder] = files
    return out


def read_folder(folder: Path, files: Sequence[Path], partial: bool = False) -> LogFolder:
    """Every scalar of ``files`` (one folder's event files, oldest first). A damaged record is a
    ConfigError naming the file, unless ``partial``: then what comes before it is kept."""
    from tensorboard.util import tensor_util

    points: dict[str, list[tuple[int, float, float]]] = {}
    plugins: dict[str, str] = {}  # tag -> plugin, from the tag's first value (later ones may lack it)
    other: dict[str, set[str]] = {}
    damage = None
    for path in files:
        loader = _loader(path)
        try:
            for event in loader.Load():
                if event.WhichOneof("what") != "summary":
                    continue
                for value in event.summary.value:
                    plugin = plugins.setdefault(value.tag, value.metadata.plugin_data.plugin_name
                                                or value.WhichOneof("value") or "")
                    if plugin != "scalars":
                        other.setdefault(plugin or "other", set()).add(value.tag)
                        continue
                    v = float(tensor_util.make_ndarray(value.tensor).reshape(-1)[0])
                    points.setdefault(value.tag, []).append((int(event.step), v, float(event.wall_time)))
        except Exception as exc:  # noqa: BLE001 - garbage that passes the checksums but is not an event
            loader.damage = f"record {loader.records}: {type(exc).__name__}: {exc}"
        if loader.damage is not None:
            where = f"{path} is damaged at {loader.damage}"
            if not partial:
                raise ConfigError(f"{where}; nothing was imported. To import what comes before the damage (a "
                                  "writer killed while writing leaves a cut record at the end), add --partial; "
                                  "or move the file aside")
            damage = damage or where
    scalars: dict[str, Series] = {}
    replaced = 0
    for tag, pts in points.items():
        steps = np.array([p[0] for p in pts], dtype=np.int64)
        values = np.array([p[1] for p in pts], dtype=np.float64)
        times = np.array([p[2] for p in pts], dtype=np.float64)
        order = np.argsort(steps, kind="stable")
        steps, values, times = steps[order], values[order], times[order]
        last = np.ones(len(steps), bool)  # the last written value of each step
        last[:-1] = steps[1:] != steps[:-1]
        replaced += int(len(steps) - last.sum())
        scalars[tag] = Series(steps[last], values[last], times[last])
    return LogFolder(folder, list(files), scalars, {k: len(v) for k, v in other.items()}, damage, replaced)


def _words(tag: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", tag.lower()) if w]


_HELD_OUT = {"val", "valid", "validation", "test", "eval", "evaluation", "dev", "holdout"}


def guess_loss_tag(folder: LogFolder) -> tuple[str | None, list[str]]:
    """The tag that most looks like the training loss, and the others that also could be: a tag with a
    word containing 'loss', not of held-out data ('val', 'test', 'eval'...), not smoothed, not a loss
    scale; words 'loss' and 'train' and the most points (a per-step loss over a per-epoch one) win."""
    def rank(tag: str) -> tuple:
        words = _words(tag)
        return ("loss" not in words, "epoch" in words, "train" not in " ".join(words),
                -len(folder.scalars[tag].steps), len(tag), tag)

    candidates = []
    for tag in folder.scalars:
        words = _words(tag)
        if (any("loss" in w for w in words) and not _HELD_OUT & set(words)
                and not any(w.startswith(("smooth", "scale", "scaler")) for w in words)):
            candidates.append(tag)
    candidates.sort(key=rank)
    return (candidates[0] if candidates else None), candidates[1:]


def _natural(tag: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", tag)]


def guess_lr_tags(folder: LogFolder) -> list[str]:
    """The tags that look like learning rates (a word 'lr', or 'learning rate'), as parameter groups in
    natural order (``lr``, ``lr_1``... ``lr-SGD/pg1``, ``lr-SGD/pg2``)."""
    def is_lr(tag: str) -> bool:
        words = _words(tag)
        joined = "".join(words)
        return "lr" in words or "learningrate" in joined
    return sorted((t for t in folder.scalars if is_lr(t)), key=_natural)


@dataclass
class Imported:
    """One run made by :func:`import_logs`, and what it took from where."""

    run_id: int
    name: str
    folder: Path
    files: int
    loss_tag: str
    other_loss_tags: list[str]
    lr_tags: list[str]
    scalar_tags: list[str]
    steps: np.ndarray
    damage: str | None
    replaced: int


def _tag_list(tags: Iterable[str], most: int = 30) -> str:
    """The tags for a message: sorted, at most ``most`` of them and a count of the rest."""
    ordered = sorted(tags, key=_natural)
    text = ", ".join(repr(t) for t in ordered[:most]) or "none"
    return text + (f" and {len(ordered) - most} more" if len(ordered) > most else "")


def _pick(folder: LogFolder, loss: str | None, lr: Sequence[str] | None) -> tuple[str, list[str], list[str]]:
    """(loss tag, other loss-like tags, LR tags) for one folder; ConfigError naming the tags it has."""
    if loss is not None:
        if loss not in folder.scalars:
            raise ConfigError(f"--loss {loss!r}: {folder.folder} has no scalar tag of that name; its tags: "
                              f"{_tag_list(folder.scalars)}")
        others: list[str] = []
    else:
        guess, others = guess_loss_tag(folder)
        if guess is None:
            raise ConfigError(f"{folder.folder}: no scalar tag looks like a training loss; choose one with "
                              f"--loss TAG (its tags: {_tag_list(folder.scalars)})")
        loss = guess
    if lr is not None:
        missing = [t for t in lr if t not in folder.scalars]
        if missing:
            raise ConfigError(f"--lr {','.join(missing)!r}: {folder.folder} has no scalar tag of that name; its "
                              f"tags: {_tag_list(folder.scalars)}")
        lr_tags = list(lr)
    else:
        lr_tags = [t for t in guess_lr_tags(folder) if t != loss]
    if loss in lr_tags:
        raise ConfigError(f"{loss!r} cannot be both the loss and a learning rate; choose with --loss and --lr")
    return loss, others, lr_tags


def _files_hash(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def import_logs(
    store: Any,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    loss: str | None = None,
    lr: Sequence[str] | None = None,
    partial: bool = False,
) -> tuple[list[Imported], list[str]]:
    """Import the TensorBoard logs under ``path`` (a log folder, or one event file) into ``store``: one
    read-only run per folder of event files. Everything is read and checked first, then every run is
    stored in one transaction, so a bad folder imports nothing. Returns the runs made and notes (the
    folders skipped because they hold no scalars)."""
    require()
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"{root} does not exist; give the folder TensorBoard's --logdir points at")
    store.require_writable()
    found = _event_files(root)
    if not found:
        raise ConfigError(f"no TensorBoard event files (events.out.tfevents.*) in {root} or its subfolders; "
                          "give the folder TensorBoard's --logdir points at")
    folders, notes = [], []
    for folder, files in found.items():
        got = read_folder(folder, files, partial)
        if not got.scalars:
            held = ", ".join(f"{k} ({n} tag{'s' if n != 1 else ''})" for k, n in sorted(got.other.items()))
            what = f"they hold {held}" if held else "they hold no summaries at all"
            notes.append(f"{folder}: {len(files)} event file{'s' if len(files) != 1 else ''} but no scalars ({what})")
            continue
        folders.append(got)
    if not folders:
        raise ConfigError("; ".join(notes) + " — lrviz imports scalar logs (tf.summary.scalar, "
                          "SummaryWriter.add_scalar, Lightning's and Hugging Face's TensorBoard loggers)")
    picks = [_pick(f, loss, lr) for f in folders]

    base = root if root.is_dir() else root.parent
    made: list[Imported] = []
    with store.batch():
        for got, (loss_tag, others, lr_tags) in zip(folders, picks):
            rel = got.folder.relative_to(base).as_posix() if got.folder != base else ""
            label = name or (base.name or str(base))
            run_name = f"{label}/{rel}" if rel else label
            made.append(_store_run(store, got, run_name, loss_tag, others, lr_tags))
    return made, notes


def _store_run(store: Any, got: LogFolder, name: str, loss_tag: str, others: list[str],
               lr_tags: list[str]) -> Imported:
    """One imported run: the loss and LR tags as step columns (on the union of their steps; NaN where a
    tag has no point), every other tag as a scalar series; times relative to the first point."""
    series = {tag: got.scalars[tag] for tag in [loss_tag, *lr_tags]}
    steps = np.unique(np.concatenate([s.steps for s in series.values()]))
    everything = [s for s in got.scalars.values() if len(s.times)]
    t0 = min(float(s.times.min()) for s in everything)
    t1 = max(float(s.times.max()) for s in everything)

    def column(s: Series, what: np.ndarray) -> np.ndarray:
        out = np.full(len(steps), np.nan)
        out[np.searchsorted(steps, s.steps)] = what
        return out

    loss_s = series[loss_tag]
    cols: dict[str, np.ndarray] = {"step": steps, "loss": column(loss_s, loss_s.values)}
    if lr_tags:
        cols["lr"] = np.stack([column(series[t], series[t].values) for t in lr_tags], axis=1)
    times = column(loss_s, loss_s.times)
    for t in lr_tags:  # a row with no loss point: the LR's time
        missing = np.isnan(times)
        times[missing] = column(series[t], series[t].times)[missing]
    cols["time"] = times - t0

    config = {"source": "tensorboard", "logdir": str(got.folder), "files": [f.name for f in got.files],
              "loss_tag": loss_tag, "lr_tags": lr_tags}
    run_id = store.create_run(script_path=str(got.folder), script_hash=_files_hash(got.files), config=config,
                              device="", name=name, kind="imported")
    for i in range(0, len(steps), IMPORT_CHUNK):
        part = {k: v[i:i + IMPORT_CHUNK] for k, v in cols.items()}
        store.append_steps(run_id, int(part["step"][0]), part)
    extra = [t for t in got.scalars if t not in series]
    for tag in extra:
        s = got.scalars[tag]
        store.add_scalars(run_id, tag, s.steps, s.values, s.times - t0)
    summary = {"imported": {"from": str(got.folder), "event_files": len(got.files), "damage": got.damage,
                            "replaced_points": got.replaced}}
    store.set_status(run_id, "finished", summary=summary, started_at=t0, ended_at=t1)
    return Imported(run_id, name, got.folder, len(got.files), loss_tag, others, lr_tags, sorted(extra, key=_natural),
                    steps, got.damage, got.replaced)
