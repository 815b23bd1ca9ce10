"""The command line: the desktop app, and the same engine headless.

``lrviz`` / ``lrviz SCRIPT.py`` open the app; ``run``, ``replay``, ``runs`` and ``export`` work
headless. This module is the one composition root: it imports the Qt layer lazily, only for the
app and for plot images.

Exit status: 0 finished (or stopped), 1 the script or a setting was wrong, 2 the run diverged.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, LrvizError

log = logging.getLogger("lrviz")

COMMANDS = ("run", "replay", "resume", "runs", "export", "find-lr", "sweep")
PROGRESS_EVERY = 2.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a ConfigError (one message, exit status 1), not exit 2,
    which means "diverged" here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="PATH", help="run store (a .sqlite file or a folder); "
                   "default: $LRVIZ_HOME or the user data folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=str, help="train for N optimizer steps")
    g.add_argument("--epochs", type=str, help="train for E epochs")
    p.add_argument("--lr", type=str, help="learning rate, e.g. 0.01 or 3e-4")
    p.add_argument("--optimizer", help="sgd, adam, adamw, rmsprop or adagrad")
    p.add_argument("--momentum", type=str, help="momentum (beta1 for adam/adamw)")
    p.add_argument("--weight-decay", type=str, help="weight decay")
    p.add_argument("--nesterov", action="store_true", default=None, help="nesterov momentum (sgd)")
    p.add_argument("--schedule", metavar="SPEC", help="e.g. CosineAnnealingLR:T_max=1000 (torch names)")
    p.add_argument("--batch-size", type=str, help="batch size, when the script's build_data takes one")
    p.add_argument("--seed", type=str, help="random seed (Python, NumPy, torch)")
    p.add_argument("--eval-every", type=str, help="validate every N steps (default: once per epoch)")
    p.add_argument("--device", help="auto, cpu, cuda or mps")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="set one of the script's PARAMS knobs (repeatable)")
    p.add_argument("--checkpoint-every", type=str, metavar="N", help="save a checkpoint every N steps")
    p.add_argument("--on-divergence", choices=("stop", "rollback", "off"), dest="divergence",
                   help="when the loss explodes or turns NaN: stop (exit 2; default), roll back to the last "
                   "good checkpoint with LR/10 (needs --checkpoint-every, default 200 then), or off")
    p.add_argument("--early-stopping", type=str, metavar="PATIENCE",
                   help="stop when the validation loss has not improved for this many validation passes")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the headless commands."""
    parser = _Parser(
        prog="lrviz", description="A learning-rate laboratory for PyTorch. With no command, or with a "
        "script path, opens the desktop app.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="train a script headless")
    p.add_argument("script", help="experiment script (.py) or a built-in example name")
    _training_args(p)
    p.add_argument("--at", action="append", default=[], metavar="STEP:SETTING=VALUE",
                   help="intervention: STEP:lr=X, STEP:schedule=SPEC, STEP:momentum=M, STEP:weight_decay=W")
    p.add_argument("--out", metavar="DIR", help="write metrics.csv, run.json and loss/LR plots here")
    p.add_argument("--name", help="name of the stored run")
    p.add_argument("--fork", metavar="RUN@STEP", help="continue stored run RUN from its checkpoint at STEP "
                   "as a new child run (with the settings given here, e.g. another --lr or --schedule)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _common(p)

    p = sub.add_parser("resume", help="continue a stopped or interrupted run from its last checkpoint")
    p.add_argument("run", help="run id or name")
    p.add_argument("--steps", type=str, help="train until this many steps in all (default: as configured)")
    p.add_argument("--out", metavar="DIR", help="write the run's files here at the end")
    p.add_argument("--quiet", action="store_true")
    _common(p)

    p = sub.add_parser("replay", help="re-run a stored run with its seed, config and interventions")
    p.add_argument("run", help="run id or name (see `lrviz runs`)")
    p.add_argument("--out", metavar="DIR", help="write the replay's files here")
    p.add_argument("--quiet", action="store_true")
    _common(p)

    p = sub.add_parser("find-lr", help="LR range test: sweep the rate exponentially, suggest one")
    p.add_argument("script", help="experiment script (.py) or a built-in example name")
    p.add_argument("--start", type=str, default="1e-7", help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=str, default="10", help="last learning rate (default 10)")
    p.add_argument("--steps", type=str, default="100", dest="sweep_steps",
                   help="number of steps of the sweep (default 100)")
    p.add_argument("--beta", type=str, default="0.98", help="smoothing of the loss (debiased EMA, default 0.98)")
    p.add_argument("--stop-factor", type=str, default="4", help="stop when the smoothed loss exceeds this "
                   "multiple of its best (default 4)")
    p.add_argument("--method", default="valley", choices=("valley", "steepest", "minimum_tenth"),
                   help="which suggestion to print as the one to use when none is confirmed (all are printed)")
    p.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=None,
                   help="train a few rates from the suggestion band from the same weights for a short while "
                   "and pick the one whose loss fell most (default: when that costs fewer steps than the "
                   "range test itself)")
    p.add_argument("--confirm-steps", type=str, default="20",
                   help="steps each rate trains for when confirming (default 20)")
    for flag, hlp in (("--optimizer", "sgd, adam, adamw, rmsprop or adagrad"), ("--momentum", "momentum"),
                      ("--weight-decay", "weight decay"), ("--batch-size", "batch size"),
                      ("--seed", "random seed"), ("--device", "auto, cpu, cuda or mps")):
        p.add_argument(flag, type=str, help=hlp)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--out", metavar="DIR", help="write lr_find.csv, lr_find.json and lr_find.png here")
    _common(p)

    from . import sweep

    p = sub.add_parser("sweep", help="train at several learning rates, one after another; compare them")
    sweep.add_arguments(p)

    p = sub.add_parser("runs", help="list stored runs")
    _common(p)

    p = sub.add_parser("export", help="write a stored run's data and plots")
    p.add_argument("run", help="run id or name")
    p.add_argument("--out", metavar="DIR", default=".", help="output folder (default: .)")
    p.add_argument("--format", default="png,csv,json", help="comma-separated: png,svg,pdf,csv,json")
    _common(p)
    return parser


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"--param {item!r}: use NAME=VALUE")
        out[name.strip()] = _literal(value)
    return out


def _literal(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def config_from_args(experiment: Any, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """The run's config: the script's DEFAULTS (or ``base``), overridden by the flags that were given."""
    from .config import RunConfig

    overrides = {
        "lr": args.lr, "optimizer": args.optimizer, "momentum": args.momentum,
        "weight_decay": args.weight_decay, "nesterov": args.nesterov, "schedule": args.schedule,
        "batch_size": args.batch_size, "seed": args.seed, "eval_every": args.eval_every,
        "device": args.device, "steps": args.steps, "epochs": args.epochs,
        "checkpoint_every": args.checkpoint_every, "divergence": args.divergence,
        "early_stopping": args.early_stopping,
    }
    base = RunConfig.from_dict(base) if base is not None else RunConfig(**experiment.defaults)
    if args.steps is not None:
        base.epochs = None
    if args.epochs is not None:
        base.steps = None
    cfg = base.merged(overrides)
    params = _parse_params(args.param)
    if params:
        unknown = sorted(set(params) - set(experiment.params))
        if unknown:
            known = ", ".join(sorted(experiment.params)) or "none"
            raise ConfigError(f"unknown --param {', '.join(unknown)}; this script's PARAMS: {known}")
        cfg.params = {**cfg.params, **params}
    if cfg.batch_size is not None and not experiment.accepts_batch_size and args.batch_size is not None:
        raise ConfigError(f"--batch-size: {experiment.path.name}'s build_data() takes no batch_size argument")
    if not experiment.accepts_batch_size:
        cfg.batch_size = None
    if cfg.divergence == "rollback" and cfg.checkpoint_every is None:
        cfg.checkpoint_every = 200
    return cfg.validated()


def check_out_dir(out: str | None) -> Path | None:
    """Create ``out`` and prove it writable before any training starts."""
    if out is None:
        return None
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lrviz-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"--out {out}: cannot write there ({reason}); choose another folder") from None
    return path


class Progress:
    """Prints a progress line on stderr every few seconds while an engine trains."""

    def __init__(self, engine: Any, quiet: bool = False):
        self.engine = engine
        self.quiet = quiet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lrviz-progress", daemon=True)

    def __enter__(self) -> Progress:
        if not self.quiet:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def line(self) -> str:
        eng = self.engine
        buf = eng.buffer
        step, total = eng.step, eng.total_steps
        parts = [f"step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total else "")]
        if buf is not None and len(buf):
            v = buf.view(len(buf) - 1)
            parts.append(f"loss {float(v['loss'][-1]):.4g}")
            parts.append(f"lr {float(v['lr'][-1][0]):.3g}")
            dt = float(v["time"][-1])
            if dt > 0:
                rate = len(buf) / dt
                parts.append(f"{rate:.0f} steps/s")
                if total and rate > 0:
                    parts.append(f"ETA {max(0.0, (total - step) / rate):.0f}s")
        return "  ".join(parts)

    def _loop(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY):
            if self.engine.state in ("running", "paused"):
                print(self.line(), file=sys.stderr, flush=True)


def open_store(path: str | None) -> Any:
    from .store import RunStore

    return RunStore(path)


def train_headless(engine: Any, quiet: bool) -> str:
    """Run the engine in a worker thread; Ctrl+C stops it cleanly (the run is saved as stopped)."""
    engine.start()
    with Progress(engine, quiet):
        try:
            while not engine.join(0.2):
                pass
        except KeyboardInterrupt:
            print("stopping (Ctrl+C)...", file=sys.stderr)
            engine.stop()
            engine.join()
    return engine.state


def finish_run(engine: Any, store: Any, out: Path | None, quiet: bool) -> int:
    """Report the end of a run, write ``--out`` files; return the exit status."""
    state = engine.state
    if out is not None and engine.run_id is not None:
        _write_outputs(store, engine.run_id, out)
    s = engine.summary()
    if state in ("finished", "stopped"):
        if not quiet:
            best = s.get("best_loss")
            extra = f", best val loss {s['best_val_loss']:.4g}" if s.get("best_val_loss") is not None else ""
            best_txt = f"{best:.4g}" if best is not None and math.isfinite(best) else "n/a"
            print(f"run {engine.run_id} {state}: {engine.step} steps, best loss {best_txt}{extra}",
                  file=sys.stderr)
        return 0
    if state == "diverged":
        print(f"lrviz: run {engine.run_id} diverged: {engine.error}", file=sys.stderr)
        return 2
    raise engine.error if engine.error is not None else LrvizError(f"the run ended as {state}")


def _write_outputs(store: Any, run_id: int, out: Path) -> None:
    from .export import export_run

    formats = ["csv", "json"]
    try:
        import lrviz.ui.render  # noqa: F401  (the plots need Qt)

        formats.append("png")
    except Exception as exc:  # Qt missing or broken: the data still gets written
        print(f"lrviz: plots skipped ({exc}); metrics.csv and run.json written", file=sys.stderr)
    export_run(store, run_id, out, formats)


def cmd_run(args: argparse.Namespace) -> int:
    from .engine import TrainingEngine
    from .experiment import load_experiment
    from .interventions import parse_at

    exp = load_experiment(args.script)
    ats = [parse_at(a) for a in args.at]
    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        origin = None
        if args.fork:
            origin, ats = fork_origin(store, args.fork, args, ats)
            cfg = config_from_args(exp, args, base=store.get_run(origin.run_id).config)
        else:
            cfg = config_from_args(exp, args)
        engine = TrainingEngine(exp, cfg, store, interventions=ats, name=args.name, origin=origin)
        train_headless(engine, args.quiet)
        return finish_run(engine, store, out, args.quiet)
    finally:
        store.close()


def checkpoint_events(store: Any, run_id: int) -> dict[int, str]:
    """Step -> checkpoint file of a stored run's checkpoints that still exist."""
    out = {}
    for e in store.load_events(run_id):
        if e.kind == "checkpoint" and Path(e.data.get("path", "")).exists():
            out[e.step] = e.data["path"]
    return out


def fork_origin(store: Any, ref: str, args: argparse.Namespace, ats: list[Any]) -> tuple[Any, list[Any]]:
    """The Origin of ``--fork RUN@STEP``; the settings given on the command line apply from STEP."""
    from .engine import Origin
    from .interventions import Intervention, check

    run_ref, at, step_text = ref.rpartition("@")
    if not at or not run_ref:
        raise ConfigError(f"--fork {ref!r}: use RUN@STEP, e.g. 3@500 (see `lrviz runs`)")
    try:
        step = int(step_text)
    except ValueError:
        raise ConfigError(f"--fork {ref!r}: {step_text!r} is not a step number") from None
    parent = store.get_run(run_ref)
    points = checkpoint_events(store, parent.id)
    if step not in points:
        have = ", ".join(str(k) for k in sorted(points)) or "none (run it with --checkpoint-every N)"
        raise ConfigError(f"--fork {ref!r}: run {parent.id} has no checkpoint at step {step}; it has: {have}")
    extra = []
    if args.lr is not None:
        extra.append(Intervention(step, "set_lr", check("set_lr", {"lr": args.lr})))
    if args.schedule is not None:
        extra.append(Intervention(step, "set_schedule", check("set_schedule", {"spec": args.schedule})))
    hp = {"momentum": args.momentum, "weight_decay": args.weight_decay}
    if any(v is not None for v in hp.values()):
        extra.append(Intervention(step, "set_hyperparams", check("set_hyperparams", hp)))
    return Origin("fork", parent.id, Path(points[step]), step), extra + ats


def cmd_resume(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .engine import Origin, TrainingEngine
    from .experiment import load_experiment

    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        info = store.get_run(args.run)
        if info.status in ("running", "paused"):
            raise ConfigError(f"run {info.id} is {info.status} in another process; stop it there first")
        points = checkpoint_events(store, info.id)
        if not points:
            raise ConfigError(f"run {info.id} has no checkpoint to resume from (runs keep checkpoints when "
                              "started with --checkpoint-every N, and in the app at every pause)")
        step = max(points)
        exp = load_experiment(info.script_path)
        cfg = RunConfig.from_dict(info.config)
        if args.steps is not None:
            cfg.steps, cfg.epochs = args.steps, None
        engine = TrainingEngine(exp, cfg, store, origin=Origin("resume", info.id, Path(points[step]), step))
        print(f"resuming run {info.id} from its checkpoint at step {step}", file=sys.stderr)
        train_headless(engine, args.quiet)
        return finish_run(engine, store, out, args.quiet)
    finally:
        store.close()


def cmd_replay(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .engine import TrainingEngine
    from .experiment import load_experiment
    from .interventions import from_events

    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        info = store.get_run(args.run)
        exp = load_experiment(info.script_path)
        if exp.source_hash != info.script_hash:
            print(f"lrviz: warning: {info.script_path} changed since run {info.id}; the replay may differ",
                  file=sys.stderr)
        cfg = RunConfig.from_dict(info.config)
        if info.steps:
            cfg.steps, cfg.epochs = info.steps, None  # exactly as many steps as the original ran
        events = store.load_events(info.id)
        engine = TrainingEngine(exp, cfg, store, interventions=from_events(events),
                                name=f"replay of {info.name}")
        train_headless(engine, args.quiet)
        status = finish_run(engine, store, out, args.quiet)
        original = store.load_steps(info.id)["loss"]
        replayed = store.load_steps(engine.run_id)["loss"]
        n = min(len(original), len(replayed))
        same = (original[:n].tobytes() == replayed[:n].tobytes()) and len(original) == len(replayed)
        if same:
            print(f"replay {engine.run_id} of run {info.id}: loss trace identical ({n} steps)", file=sys.stderr)
        else:
            diff = [i for i in range(n) if original[i].tobytes() != replayed[i].tobytes()]
            first = diff[0] if diff else n
            print(f"replay {engine.run_id} of run {info.id}: loss traces differ from step {first} "
                  f"({len(original)} vs {len(replayed)} steps)", file=sys.stderr)
        return status
    finally:
        store.close()


def cmd_runs(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    try:
        runs = store.list_runs()
        if not runs:
            print(f"no runs in {store.path}")
            return 0
        print(f"{'id':>4}  {'name':<28} {'status':<11} {'steps':>8} {'best loss':>10} {'final loss':>10}  started")
        for r in runs:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at or r.created_at))
            best = f"{r.best_loss:.4g}" if r.best_loss is not None else "-"
            final = f"{r.final_loss:.4g}" if r.final_loss is not None else "-"
            print(f"{r.id:>4}  {r.name[:28]:<28} {r.status:<11} {r.steps:>8} {best:>10} {final:>10}  {started}")
        return 0
    finally:
        store.close()


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        info = store.get_run(args.run)
        paths = export_run(store, info.id, out, formats)
        for p in paths:
            print(p)
        return 0
    finally:
        store.close()


def cmd_find_lr(args: argparse.Namespace) -> int:
    import json

    from .experiment import load_experiment
    from .export import atomic_write
    from .rangetest import find_lr, write_csv

    exp = load_experiment(args.script)
    for name in ("lr", "schedule", "steps", "epochs", "eval_every", "nesterov", "checkpoint_every",
                 "divergence", "early_stopping"):
        setattr(args, name, None)
    cfg = config_from_args(exp, argparse.Namespace(**{**vars(args), "steps": None}))
    nums = {}
    for name in ("start", "end", "beta", "stop_factor"):
        try:
            nums[name] = float(getattr(args, name))
        except ValueError:
            raise ConfigError(f"--{name.replace('_', '-')} must be a number, not {getattr(args, name)!r}") from None
    ints = {}
    for flag, value in (("--steps", args.sweep_steps), ("--confirm-steps", args.confirm_steps)):
        try:
            ints[flag] = int(value)
        except ValueError:
            raise ConfigError(f"{flag} must be a whole number, not {value!r}") from None
    out = check_out_dir(args.out)
    result = find_lr(exp, cfg, steps=ints["--steps"], method=args.method, confirm=args.confirm,
                     confirm_steps=ints["--confirm-steps"], **nums)
    s = result.suggestions
    print(f"range test: {len(result.lrs)} steps from lr {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}"
          + (f" ({result.stop_reason})" if result.stop_reason else ""))
    if s.best is None and s.reason is not None:
        print(f"no suggestion: {s.reason}")
    else:
        for method, value in s.values().items():
            mark = "  <- suggested" if method == s.chosen else ""
            print(f"  {method:<14} {value:.3g}{mark}" if value is not None else f"  {method:<14} -")
        c = result.confirmation
        if c is not None:
            print(f"  {'confirmed':<14} " + (f"{s.confirmed:.3g}  <- suggested" if s.confirmed is not None else "-"))
            print(f"confirmation ({len(c.trials)} rates x {c.steps} steps): {c.reason}")
        elif result.confirm_note:
            print(result.confirm_note)
        lo, hi = s.band()
        print(f"suggested learning rate: {s.best:.3g} ({s.chosen}; band {lo:.3g} .. {hi:.3g})")
    if out is not None:
        write_csv(result, out / "lr_find.csv")
        atomic_write(out / "lr_find.json", json.dumps(result.to_dict(), indent=2, allow_nan=False))
        try:
            from lrviz.ui.render import render_range_test
        except Exception as exc:  # Qt missing: the data is still written
            print(f"lrviz: plot skipped ({exc})", file=sys.stderr)
        else:
            render_range_test(result, out / "lr_find.png", title=f"LR range test — {exp.path.name}")
    return 0


def _plot_overlay(rows: list[Any], out: Path, store_path: str | None, script: str) -> None:
    """``sweep.png``: every run's loss and learning rate overlaid (needs Qt; skipped without it)."""
    ids = [(r.run_id, f"lr {r.lr:.3g}" + (" (diverged)" if r.diverged else "")) for r in rows
           if r.run_id is not None]
    if not ids:
        return
    try:
        from lrviz.ui.render import RunData, render_run
    except Exception as exc:  # Qt missing: the table is still written
        print(f"lrviz: sweep plot skipped ({exc})", file=sys.stderr)
        return
    store = open_store(store_path)
    try:
        data = [RunData.from_store(store, rid, label=label) for rid, label in ids]
        render_run(data, out / "sweep.png", title=f"LR sweep — {script}")
    finally:
        store.close()


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import command

    return command(args, plot=_plot_overlay)


HANDLERS = {"run": cmd_run, "find-lr": cmd_find_lr, "sweep": cmd_sweep, "replay": cmd_replay, "resume": cmd_resume, "runs": cmd_runs,
            "export": cmd_export}


def _app(argv: list[str]) -> int:
    p = _Parser(prog="lrviz", description="Open the lrviz desktop app "
                                f"(headless commands: {', '.join(COMMANDS)}; see lrviz COMMAND --help).")
    p.add_argument("script", nargs="?", help="experiment script to open (default: the built-in example)")
    _common(p)
    args = p.parse_args(argv)
    _logging(args.debug)
    try:
        from lrviz.ui.app import run_app
    except ImportError as exc:
        raise ConfigError(f"the desktop app needs PySide6 and pyqtgraph ({exc}); headless commands still work: "
                          "lrviz run SCRIPT.py") from None
    return run_app(args.script, args.store)


def _logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="lrviz: %(levelname)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lrviz`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--at -1:lr=0.1` would read as an option to argparse; glue values to their flag
    for i in range(len(argv) - 1, 0, -1):
        if argv[i - 1] == "--at" and argv[i].startswith("-"):
            argv[i - 1:i + 1] = [f"--at={argv[i]}"]
    debug = "--debug" in argv
    try:
        if argv and argv[0] in HANDLERS:
            args = build_parser().parse_args(argv)
            _logging(args.debug)
            return HANDLERS[args.command](args)
        if argv and argv[0] in COMMANDS:
            raise ConfigError(f"`lrviz {argv[0]}` is not available in this version")
        return _app(argv)
    except LrvizError as exc:
        if debug:
            raise
        print(f"lrviz: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
