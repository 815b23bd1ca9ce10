"""LR sweeps: the same experiment at several learning rates, one after another, and how fast each converges.

:func:`run_sweep` trains one run per rate with :class:`~lrviz.engine.TrainingEngine` and returns a
:class:`SweepRow` per run: its final and best losses, whether it diverged, and the number of steps
it took to reach a common target loss (the speed of convergence). :func:`parse_lrs` reads the rates
from text (``1e-4:1:7`` or ``0.1,0.03,0.01``); :func:`write_table_csv` and :func:`format_table` write
the table. ``add_arguments``/``command`` are the ``lrviz sweep`` command line.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig, parse_finite, parse_lr
from ..errors import ConfigError
from .rangecurve import smooth

log = logging.getLogger(__name__)

#: Smoothing of the training loss for ``steps_to_target`` (debiased EMA).
SMOOTH_BETA = 0.9
#: With no target given, the target is this factor times the best final smoothed loss of the sweep.
DEFAULT_TARGET_FACTOR = 1.1
MAX_LRS = 1000


@dataclass
class SweepRow:
    """One run of a sweep.

    ``state`` is the engine's final state (finished, stopped, diverged, failed). ``steps`` is the
    number of steps trained. ``final_loss`` is the last step's training loss (non-finite when the
    run diverged that way), ``best_loss`` the lowest finite one; the ``*_val_loss`` fields are the
    same for validation (None without validation data). ``steps_to_target`` is the first step
    (counted from 0) whose smoothed training loss (debiased EMA, beta 0.9) is <= ``target_loss``,
    None when never. ``diverged`` is True when the run was stopped for divergence or its last
    loss is not finite. ``target_loss`` is the target used for the whole sweep.
    """

    lr: float
    run_id: int | None
    state: str
    steps: int
    final_loss: float | None
    best_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    steps_to_target: int | None
    diverged: bool
    target_loss: float | None = None


COLUMNS = tuple(f.name for f in fields(SweepRow))


# ---- the rates -----------------------------------------------------------------------------------------
def parse_lrs(text: str) -> list[float]:
    """Learning rates from text: ``start:end:count`` (log-spaced, both ends included) or ``a,b,c``.

    ``1e-4:1:5`` gives 1e-4, 1e-3, 0.01, 0.1, 1; ``0.1,0.03,0.01`` gives those, in that order.
    Raises :class:`ConfigError` on anything else.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("learning rates: give start:end:count (e.g. 1e-4:1:7) or a list (e.g. 0.1,0.03,0.01)")
    text = text.strip()
    if ":" in text:
        parts = [p.strip() for p in text.split(":")]
        if len(parts) != 3:
            raise ConfigError(f"learning rates {text!r}: a range is start:end:count, e.g. 1e-4:1:7")
        start = parse_lr(parts[0], f"the start of the range {text!r}")
        end = parse_lr(parts[1], f"the end of the range {text!r}")
        try:
            count = int(parts[2])
        except ValueError:
            raise ConfigError(f"learning rates {text!r}: the count must be a whole number, "
                              f"not {parts[2]!r}") from None
        if not 1 <= count <= MAX_LRS:
            raise ConfigError(f"learning rates {text!r}: the count must be from 1 to {MAX_LRS}, not {count}")
        if count == 1:
            if start != end:
                raise ConfigError(f"learning rates {text!r}: a count of 1 needs start == end; "
                                  "use a count of 2 or more for a range")
            return [start]
        ratio = math.log(end / start)
        return [float(f"{start * math.exp(ratio * i / (count - 1)):.6g}") for i in range(count)]
    items = [p.strip() for p in text.split(",")]
    if any(not p for p in items):
        raise ConfigError(f"learning rates {text!r}: an empty item; separate rates with commas, e.g. 0.1,0.01")
    if len(items) > MAX_LRS:
        raise ConfigError(f"learning rates {text!r}: at most {MAX_LRS} rates")
    return [parse_lr(p, f"learning rate {p!r} in {text!r}") for p in items]


# ---- the sweep -----------------------------------------------------------------------------------------
def smoothed(losses: Sequence[float] | np.ndarray, beta: float = SMOOTH_BETA) -> np.ndarray:
    """Debiased exponential moving average of ``losses`` (non-finite from the first non-finite value on)."""
    return smooth(losses, beta)


def default_target(final_smoothed: Sequence[float]) -> float | None:
    """1.1 x the best (lowest) finite value; for a negative best, best + 0.1 x |best|. None if none."""
    finite = [v for v in final_smoothed if v is not None and math.isfinite(v)]
    if not finite:
        return None
    best = float(min(finite))
    return best + (DEFAULT_TARGET_FACTOR - 1.0) * abs(best)


def first_at_or_below(steps: np.ndarray, smooth_loss: np.ndarray, target: float | None) -> int | None:
    """The first step whose smoothed loss is <= target, or None."""
    if target is None or not len(smooth_loss):
        return None
    hits = np.flatnonzero(smooth_loss <= target)  # NaN compares False
    return int(steps[hits[0]]) if hits.size else None


@dataclass
class Outcome:
    """A finished sweep run: its row, and its steps and smoothed losses (for ``steps_to_target``)."""

    row: SweepRow
    steps: np.ndarray
    smooth: np.ndarray


def outcome(lr: float, engine: Any) -> Outcome:
    """The row of a run that trained at ``lr`` and ended: ``engine`` is a TrainingEngine or any
    :class:`lrviz.live.run.Run` (its ``buffer``, ``validation``, ``state``, ``step``, ``run_id``)."""
    buf = engine.buffer
    if buf is not None and len(buf):
        v = buf.view()
        loss = np.array(v["loss"], dtype=np.float64)
        steps = np.array(v["step"])
    else:
        loss = np.zeros(0)
        steps = np.zeros(0, dtype=np.int64)
    finite = loss[np.isfinite(loss)]
    final = float(loss[-1]) if loss.size else None
    vals = [p.loss for p in engine.validation]
    finite_vals = [x for x in vals if math.isfinite(x)]
    diverged = engine.state == "diverged" or (final is not None and not math.isfinite(final))
    row = SweepRow(
        lr=lr, run_id=engine.run_id, state=str(engine.state), steps=int(engine.step),
        final_loss=final, best_loss=float(finite.min()) if finite.size else None,
        final_val_loss=float(vals[-1]) if vals else None,
        best_val_loss=float(min(finite_vals)) if finite_vals else None,
        steps_to_target=None, diverged=diverged,
    )
    return Outcome(row, steps, smoothed(loss))


def sweep_config(config: RunConfig, lr: float) -> RunConfig:
    """The configuration of the sweep's run at ``lr``."""
    over: dict[str, Any] = {"lr": lr}
    # a sweep measures each rate as given: a divergence ends that run (the sweep goes on) rather than
    # pausing it (nobody to resume) or rolling back to a lower rate
    if getattr(config, "divergence", "stop") in ("pause", "rollback"):
        over["divergence"] = "stop"
    return config.merged(over)


def run_sweep(
    experiment: Any,
    config: RunConfig,
    lrs: Sequence[float],
    *,
    store: Any = None,
    target_loss: float | None = None,
    on_run: Callable[[int, Any], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_done: Callable[[int, SweepRow], None] | None = None,
) -> list[SweepRow]:
    """Train ``experiment`` once per rate in ``lrs`` (in that order) with ``config``; one row per run.

    Each run is ``TrainingEngine(experiment, config with lr, store, name="sweep lr=...").run()``, in
    the calling thread. ``on_run(index, engine)`` is called right after each engine is created (to
    plot it live, or to ``stop()`` it: the row is then 'stopped' and the sweep goes on);
    ``should_stop()`` is checked before each run and ends the sweep early (the rows so far are
    returned). ``on_done(index, row)`` is called after each run (its ``steps_to_target`` is filled
    only when ``target_loss`` is given). A run that diverges is a row with ``diverged=True`` and the
    sweep continues. A run that fails before its first step (the script or a setting is wrong, so
    every rate would fail) raises that error; one that fails later is a row with state 'failed'.

    ``target_loss`` None: the target is 1.1 x the best final smoothed training loss of the runs that
    neither diverged nor failed, computed after all runs.
    """
    from ..engine import TrainingEngine

    rates = [parse_lr(x) for x in lrs]
    if not rates:
        raise ConfigError("no learning rates to sweep")
    if target_loss is not None:
        target_loss = parse_finite(target_loss, "target loss")
    sweep_config(config, rates[0]).validated()  # a bad setting fails before any training
    outcomes: list[Outcome] = []
    for i, lr in enumerate(rates):
        if should_stop():
            break
        engine = TrainingEngine(experiment, sweep_config(config, lr), store, name=run_name(lr))
        if on_run is not None:
            on_run(i, engine)
        engine.run()
        if engine.state == "failed" and engine.step == 0 and engine.error is not None:
            raise engine.error
        out = outcome(lr, engine)
        del engine  # keep only the numbers, not every run's model
        log.info("sweep %d/%d lr=%g: %s after %d steps", i + 1, len(rates), lr, out.row.state, out.row.steps)
        if target_loss is not None:
            with_target([out], target_loss)
        outcomes.append(out)
        if on_done is not None:
            on_done(i, out.row)
    return with_target(outcomes, target_loss)


def run_name(lr: float) -> str:
    """The stored name of the sweep's run at ``lr``."""
    return f"sweep lr={lr:.3g}"


def with_target(outcomes: Sequence[Outcome], target_loss: float | None) -> list[SweepRow]:
    """The rows, each with the sweep's target and its ``steps_to_target``. ``target_loss`` None:
    1.1 x the best final smoothed training loss of the runs that neither diverged nor failed."""
    target = target_loss
    if target is None:
        target = default_target([o.smooth[-1] for o in outcomes
                                 if o.smooth.size and not o.row.diverged and o.row.state != "failed"])
    for o in outcomes:
        o.row.target_loss = target
        o.row.steps_to_target = first_at_or_below(o.steps, o.smooth, target)
    return [o.row for o in outcomes]


# ---- the table -----------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # shortest round trip; nan/inf read back with float()
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def write_table_csv(rows: Sequence[SweepRow], path: str | Path) -> None:
    """Write the rows as CSV (a header of the :class:`SweepRow` fields; empty cells for None) atomically."""
    from ..export import atomic_write

    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_cell(getattr(r, c)) for c in COLUMNS])
    atomic_write(path, text.getvalue())


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_table(rows: Sequence[SweepRow]) -> str:
    """The rows as a fixed-width text table, with the target and the fastest rate below it."""
    head = ("lr", "state", "steps", "final loss", "best loss", "final val", "best val", "to target", "run")
    body = [(f"{r.lr:.3g}", r.state, str(r.steps), _num(r.final_loss), _num(r.best_loss),
             _num(r.final_val_loss), _num(r.best_val_loss),
             "-" if r.steps_to_target is None else str(r.steps_to_target),
             "-" if r.run_id is None else str(r.run_id)) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    left = {1}  # the state column reads better left-aligned

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(head), line(["-" * w for w in widths])]
    lines += [line(b) for b in body]
    if not rows:
        lines.append("(no runs)")
        return "\n".join(lines)
    target = rows[0].target_loss
    lines.append("")
    lines.append(f"target loss: {_num(target)} (smoothed training loss, debiased EMA beta {SMOOTH_BETA})"
                 if target is not None else "target loss: none (no run finished without diverging)")
    reached = [r for r in rows if r.steps_to_target is not None and not r.diverged]
    if reached:
        fast = min(reached, key=lambda r: r.steps_to_target)  # type: ignore[arg-type,return-value]
        lines.append(f"fastest to target: lr {fast.lr:.3g} ({fast.steps_to_target} steps)")
    n_div = sum(r.diverged for r in rows)
    if n_div:
        lines.append(f"diverged: {n_div} of {len(rows)} runs")
    return "\n".join(lines)


# ---- the command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lrviz sweep``, all of them (including --store and --debug)."""
    p.add_argument("script", help="experiment script (.py) or a built-in example name")
    p.add_argument("--lrs", required=True, metavar="RATES",
                   help="start:end:count (log-spaced, e.g. 1e-4:1:7) or a list (e.g. 0.1,0.03,0.01)")
    p.add_argument("--target-loss", type=str, metavar="X", help="count the steps until the smoothed training "
                   "loss is <= X (default: 1.1 x the best final smoothed loss of the sweep)")
    from ..cli import config_args, step_args

    config_args(p, each_run=True)
    step_args(p)
    p.add_argument("--on-divergence", choices=("stop", "off"), dest="divergence",
                   help="stop (default): a run whose loss explodes or turns NaN ends as diverged; "
                   "off: only NaN/inf ends it")
    p.add_argument("--out", metavar="DIR", help="write sweep.csv here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--store", metavar="PATH", help="run store (a .sqlite file or a folder); "
                   "default: $LRVIZ_HOME or the user data folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def _target_arg(text: str | None) -> float | None:
    return None if text is None else parse_finite(text, "--target-loss")


def command(args: argparse.Namespace, plot: Callable[..., None] | None = None) -> int:
    """``lrviz sweep``: run the sweep, print the table, write ``sweep.csv`` to ``--out``.

    Exit status 0 when the sweep ran, even if some (or all) runs diverged: the table says which;
    1 when the script or a setting is wrong (raised as LrvizError for the caller to print);
    130 when interrupted with Ctrl+C (the rows so far are printed and written).
    """
    from ..cli.common import (
        Interrupts,
        Progress,
        check_out_dir,
        config_from_args,
        interrupts,
        load_script,
        open_store,
    )

    exp = load_script(args.script)
    lrs = parse_lrs(args.lrs)
    target = _target_arg(getattr(args, "target_loss", None))
    ns = argparse.Namespace(**vars(args))
    for name in ("lr", "checkpoint_every", "early_stopping", "divergence", "nesterov", "schedule",
                 "eval_every", "device", "batch_size", "seed", "weight_decay", "momentum", "optimizer",
                 "steps", "epochs"):
        if not hasattr(ns, name):
            setattr(ns, name, None)
    if not hasattr(ns, "param"):
        ns.param = []
    ns.lr = None
    cfg = config_from_args(exp, ns)
    out = check_out_dir(getattr(args, "out", None))
    quiet = bool(getattr(args, "quiet", False))
    store = open_store(getattr(args, "store", None))
    try:
        store.require_writable()
    except BaseException:
        store.close()
        raise
    stop = threading.Event()
    current: list[Any] = [None]
    progress: list[Any] = [None]
    result: dict[str, Any] = {}

    def on_run(i: int, engine: Any) -> None:
        current[0] = engine
        if stop.is_set():  # Ctrl+C came after should_stop() was checked for this run
            engine.stop()
        if not quiet:
            print(f"run {i + 1}/{len(lrs)}: lr {lrs[i]:.3g}", file=sys.stderr, flush=True)
            progress[0] = Progress(engine, quiet).__enter__()

    def on_done(i: int, row: SweepRow) -> None:
        if progress[0] is not None:
            progress[0].__exit__(None, None, None)
            progress[0] = None
        if not quiet:
            extra = f", run {row.run_id}" if row.run_id is not None else ""
            print(f"  {row.state} after {row.steps} steps, final loss {_num(row.final_loss)}{extra}",
                  file=sys.stderr, flush=True)

    def work() -> None:
        try:
            result["rows"] = run_sweep(exp, cfg, lrs, store=store, target_loss=target, on_run=on_run,
                                       should_stop=stop.is_set, on_done=on_done)
        except BaseException as exc:  # handed to the main thread
            result["error"] = exc

    def stop_all() -> None:
        stop.set()
        if current[0] is not None:
            current[0].stop()

    def finished(timeout: float) -> bool:
        thread.join(timeout)
        return not thread.is_alive()

    interrupted = False
    intr = interrupts()
    thread = threading.Thread(target=work, name="lrviz-sweep", daemon=True)
    try:
        if intr is not None:  # Ctrl+C stops the current run and the sweep; more presses are absorbed
            with intr.stoppable(stop_all):
                thread.start()
                Interrupts.wait(finished)
            interrupted = intr.requested
        else:
            thread.start()
            try:
                Interrupts.wait(finished)
            except KeyboardInterrupt:
                interrupted = True
                print("stopping the sweep (Ctrl+C)...", file=sys.stderr)
                stop_all()
                thread.join()
    finally:
        if progress[0] is not None:
            progress[0].__exit__(None, None, None)
        store.close()
    if "error" in result:
        raise result["error"]
    rows: list[SweepRow] = result.get("rows", [])
    print(format_table(rows))
    if out is not None:
        write_table_csv(rows, out / "sweep.csv")
        if not quiet:
            print(f"wrote {out / 'sweep.csv'}", file=sys.stderr)
        if plot is not None:
            plot(rows, out, getattr(args, "store", None), exp.path.name)
    if rows and all(r.diverged for r in rows) and not quiet:
        print("every run diverged: try lower rates", file=sys.stderr)
    return 130 if interrupted else 0


__all__ = ["SweepRow", "parse_lrs", "run_sweep", "write_table_csv", "format_table", "add_arguments", "command"]
