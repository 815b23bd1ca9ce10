"""The command line: the desktop app, and the same engine headless.

``lrviz`` / ``lrviz SCRIPT.py`` open the app; ``run``, ``replay``, ``runs``, ``export``, ``import`` and
the others work headless. This module is the one composition root: it imports the Qt layer lazily, only for the
app and for plot images.

Exit status: 0 finished, 1 the script or a setting was wrong, 2 the run diverged (or the command is
unknown: argparse's usage status), 130 stopped with Ctrl+C.

Every path (``--store``, ``--out``, the script) is made absolute once, before anything runs: a script
that changes the working folder must not move the outputs or the store's checkpoints.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError, LrvizError, ScriptError, UsageError

log = logging.getLogger("lrviz")

COMMANDS = ("run", "replay", "resume", "runs", "export", "import", "find-lr", "sweep", "steer")
PROGRESS_EVERY = 2.0
#: Exit status of a command stopped with Ctrl+C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: A message echoes at most this many characters of one word of user input (a 120 KB schedule...).
ECHO_LIMIT = 300


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a ConfigError (one message, exit status 1), not exit 2,
    which means "diverged" here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="PATH", help="run store (a .sqlite file or a folder); "
                   "default: $LRVIZ_HOME or the user data folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def step_args(p: argparse.ArgumentParser) -> None:
    """How each optimizer step is made: mixed precision, gradient accumulation, clipping (run, find-lr, sweep)."""
    p.add_argument("--amp", metavar="bf16|fp16|off", help="mixed precision: autocast to bf16 (CPU and GPU) or fp16 "
                   "(CUDA, with a gradient scaler; a step it skips on inf/NaN gradients is counted)")
    p.add_argument("--accumulate", type=str, metavar="N", help="gradient accumulation: a step is one optimizer "
                   "update over N batches; its loss is their mean (default 1)")
    p.add_argument("--clip-grad-norm", type=str, metavar="X", help="clip the gradient norm to X before each update "
                   "(torch's clip_grad_norm_); the recorded norm is the one before clipping; off: no clipping")


def config_args(p: argparse.ArgumentParser, each_run: bool = False) -> None:
    """The options that make a run's configuration (``run``, ``replay``; ``sweep`` with ``each_run``:
    the same settings for every run of the sweep, whose rates come from ``--lrs`` instead of ``--lr``)."""
    g = p.add_mutually_exclusive_group()
    each = " each run" if each_run else ""
    g.add_argument("--steps", type=str, help=f"train{each} for N optimizer steps")
    g.add_argument("--epochs", type=str, help=f"train{each} for E epochs")
    if not each_run:
        p.add_argument("--lr", type=str, help="learning rate, e.g. 0.01 or 3e-4")
    p.add_argument("--optimizer", help="sgd, adam, adamw, rmsprop or adagrad")
    p.add_argument("--momentum", type=str, help="momentum (beta1 for adam/adamw)")
    p.add_argument("--weight-decay", type=str, help="weight decay")
    p.add_argument("--nesterov", action="store_true", default=None, help="nesterov momentum (sgd)")
    p.add_argument("--schedule", metavar="SPEC", help="the same schedule in every run, from its rate" if each_run
                   else "e.g. CosineAnnealingLR:T_max=1000 (torch names)")
    p.add_argument("--batch-size", type=str, help="batch size, when the script's build_data takes one")
    p.add_argument("--seed", type=str, help="random seed (the same in every run)" if each_run
                   else "random seed (Python, NumPy, torch)")
    p.add_argument("--eval-every", type=str, help="validate every N steps (default: once per epoch)")
    p.add_argument("--device", help="auto, cpu, cuda or mps")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="set one of the script's PARAMS knobs (repeatable)")


def _training_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--checkpoint-every", type=str, metavar="N", help="save a checkpoint every N steps")
    p.add_argument("--on-divergence", choices=("stop", "pause", "rollback", "off"), dest="divergence",
                   help="when the loss explodes or turns NaN: stop (exit 2; default), pause and wait for "
                   "`lrviz steer` (e.g. --rollback), roll back to the last good checkpoint with LR/10 "
                   "(pause and rollback keep checkpoints: --checkpoint-every, default 200 then), or off")
    p.add_argument("--early-stopping", type=str, metavar="PATIENCE",
                   help="stop when the validation loss has not improved for this many validation passes")
    step_args(p)


def _live_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", metavar="HOST:PORT", help="also serve the run on this TCP address (e.g. "
                   "0.0.0.0:7000) for the app or `lrviz steer` on another machine; it prints the token. "
                   "Without it the run is served on a local socket only (same user, same machine)")


class _Steer(argparse.Action):
    """Collects steering flags in the order given (``--pause --lr 0.01 --resume`` runs in that order)."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        actions = list(getattr(ns, "actions", None) or [])
        kind, key = self.const
        actions.append((kind, {key: values} if key else {}))
        ns.actions = actions


def _steer_parser(sub: Any) -> None:
    p = sub.add_parser("steer", help="change a live run from any terminal: LR, schedule, pause, stop, roll back",
                       description="Steer a live run. Each change is answered with the step it takes effect "
                       "at (accepted: from step S) or the reason it was refused; they are sent in the order "
                       "given. Exit status 1 when any is refused or the run is not live.")
    p.add_argument("run", help="run id or name (see `lrviz runs`), HOST:PORT of a run started with --listen "
                   "(give --token), or a connection file")
    p.set_defaults(actions=[])
    for flag, kind, key, meta in (("--lr", "set_lr", "lr", "X"), ("--schedule", "set_schedule", "spec", "SPEC"),
                                  ("--momentum", "set_hyperparams", "momentum", "M"),
                                  ("--weight-decay", "set_hyperparams", "weight_decay", "W"),
                                  ("--clip-grad-norm", "set_clip", "clip_grad_norm", "X|off")):
        p.add_argument(flag, action=_Steer, const=(kind, key), metavar=meta, dest="actions")
    for flag, kind, hlp in (("--pause", "pause", "pause before the next step"),
                            ("--resume", "resume", "resume a paused run"),
                            ("--step-once", "step_once", "run one step, then pause"),
                            ("--stop", "stop", "stop the run (saved as stopped)"),
                            ("--checkpoint", "checkpoint", "save a checkpoint now"),
                            ("--rollback", "rollback", "restore the last checkpoint from before the trouble, "
                             "continue with LR x --lr-factor")):
        p.add_argument(flag, action=_Steer, nargs=0, const=(kind, None), help=hlp, dest="actions")
    p.add_argument("--lr-factor", type=str, default=None, help="with --rollback: multiply the LR by this "
                   "(default 0.1)")
    p.add_argument("--token", help="the run's token (for HOST:PORT; local runs are found in the store)")
    p.add_argument("--timeout", type=str, default="60", help="seconds to wait for each answer (default 60)")
    _common(p)


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
                   help="intervention: STEP:lr=X, STEP:schedule=SPEC, STEP:momentum=M, STEP:weight_decay=W, "
                   "STEP:clip_grad_norm=X")
    p.add_argument("--out", metavar="DIR", help="write metrics.csv, run.json and loss/LR plots here")
    p.add_argument("--name", help="name of the stored run")
    p.add_argument("--fork", metavar="RUN@STEP", help="continue stored run RUN from its checkpoint at STEP "
                   "as a new child run (with the settings given here, e.g. another --lr or --schedule)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _live_args(p)
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
    step_args(p)
    p.add_argument("--out", metavar="DIR", help="write lr_find.csv, lr_find.json and lr_find.png here")
    _common(p)

    from .lab import sweep

    p = sub.add_parser("sweep", help="train at several learning rates, one after another; compare them")
    sweep.add_arguments(p)

    _steer_parser(sub)

    p = sub.add_parser("runs", help="list stored runs (live ones marked)")
    _common(p)

    p = sub.add_parser("export", help="write a stored run's data and plots")
    p.add_argument("run", help="run id or name")
    p.add_argument("--out", metavar="DIR", default=".", help="output folder (default: .)")
    p.add_argument("--format", default="png,csv,json", help="comma-separated: png,svg,pdf,csv,json,tb "
                   "(tb: a TensorBoard event file; needs the tensorboard package)")
    _common(p)

    p = sub.add_parser("import", help="read TensorBoard scalar logs into the store as read-only runs",
                       description="Import TensorBoard scalar logs: one read-only run per folder of event files "
                       "under DIR (as TensorBoard's --logdir). One tag becomes the loss, the learning-rate tags "
                       "the LR, every other scalar tag an extra series. Needs the tensorboard package.")
    p.add_argument("dir", metavar="DIR", help="a TensorBoard log folder (or one event file)")
    p.add_argument("--name", help="name of the run (of several: NAME/subfolder); default: the folder's name")
    p.add_argument("--loss", metavar="TAG", help="the tag of the training loss (default: guessed, and said)")
    p.add_argument("--lr", metavar="TAG[,TAG...]", help="the learning-rate tag(s), one per parameter group "
                   "(default: the tags named like lr or learning_rate)")
    p.add_argument("--partial", action="store_true", help="import a damaged event file up to the damage "
                   "(a writer killed while writing leaves a cut record at the end)")
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
        "early_stopping": args.early_stopping, "amp": getattr(args, "amp", None),
        "accumulate": getattr(args, "accumulate", None), "clip_grad_norm": getattr(args, "clip_grad_norm", None),
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
    if cfg.divergence in ("rollback", "pause") and cfg.checkpoint_every is None:
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
    from .store.runs import RunStore

    return RunStore(path)


class Interrupts:
    """Ctrl+C (SIGINT) during a headless command, handled so that stopping never loses the run.

    Until training starts, Ctrl+C raises KeyboardInterrupt as usual (exit status 130). Once it has
    started (:meth:`stoppable`), the first Ctrl+C calls the ``stop`` given — the run ends at the next
    step boundary and is saved as stopped, with its ``--out`` files — and every later press until the
    command ends is absorbed with a note: a second press used to land in the middle of saving, or of
    Qt's import for the plots ("Fatal Python error"), and lose the outputs. ``FORCE_AFTER`` further
    presses quit at once, for a step that never returns; the run is then shown as interrupted, as after
    a crash. Notes are written with ``os.write``: a handler must not re-enter a buffered stream.
    """

    FORCE_AFTER = 3

    def __init__(self) -> None:
        self.requested = False
        self._stop: Callable[[], None] | None = None
        self._started = False
        self._extra = 0

    @contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Handle SIGINT inside the block (only possible, and only done, in the main thread)."""
        global _interrupts
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        outer, _interrupts = _interrupts, self
        try:
            yield self
        finally:
            _interrupts = outer
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def stoppable(self, stop: Callable[[], None]) -> Iterator[None]:
        """Inside the block, the first Ctrl+C calls ``stop``."""
        self._started = True
        self._stop = stop
        if self.requested:  # pressed between two runs of a sweep
            stop()
        try:
            yield
        finally:
            self._stop = None

    @staticmethod
    def _note(text: str) -> None:
        try:
            os.write(sys.stderr.fileno(), (text + "\n").encode())
        except (OSError, ValueError):  # no usable stderr: nothing to tell
            pass

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if not self._started:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = True
            later = f"press Ctrl+C {self.FORCE_AFTER} more times to quit without waiting"
            if self._stop is None:  # training is over: only the files are being written
                self._note(f"saving the run's files (Ctrl+C); {later}")
                return
            self._note(f"stopping (Ctrl+C): the run is saved as stopped and its files written; {later}")
            self._stop()
            return
        self._extra += 1
        left = self.FORCE_AFTER - self._extra
        if left > 0:
            self._note(f"still stopping, saving the run ({left} more Ctrl+C to quit without waiting)")
            return
        self._note("lrviz: quit without waiting; the run will show as interrupted")
        os._exit(EXIT_INTERRUPTED)


#: The handler of the command running now (None outside ``main`` or off the main thread).
_interrupts: Interrupts | None = None


def interrupts() -> Interrupts | None:
    """The Ctrl+C handler of the command running now, if any."""
    return _interrupts


def train_headless(engine: Any, quiet: bool) -> str:
    """Run the engine in a worker thread; Ctrl+C stops it cleanly (the run is saved as stopped)."""
    intr = _interrupts
    with Progress(engine, quiet):
        if intr is not None:
            with intr.stoppable(engine.stop):  # before the start: a press in between still stops the run
                engine.start()
                engine.join()
        else:  # called outside main(): the default handler raises KeyboardInterrupt
            engine.start()
            try:
                while not engine.join(0.2):
                    pass
            except KeyboardInterrupt:
                print("stopping (Ctrl+C)...", file=sys.stderr)
                engine.stop()
                engine.join()
    return engine.state


def _interrupted(engine: Any) -> bool:
    """Whether the run was stopped by Ctrl+C, or by a KeyboardInterrupt the script raised."""
    if _interrupts is not None and _interrupts.requested:
        return True
    stops = [e for e in engine.events if e.kind == "stop"]
    return bool(stops) and stops[-1].data.get("reason") == "KeyboardInterrupt"


def finish_run(engine: Any, store: Any, out: Path | None, quiet: bool) -> int:
    """Report the end of a run, write ``--out`` files; return the exit status."""
    state = engine.state
    if out is not None and engine.run_id is not None:
        _write_outputs(store, engine.run_id, out)
    s = engine.summary()
    if state in ("finished", "stopped"):
        interrupted = state == "stopped" and _interrupted(engine)
        if not quiet or interrupted:
            best = s.get("best_loss")
            extra = f", best val loss {s['best_val_loss']:.4g}" if s.get("best_val_loss") is not None else ""
            best_txt = f"{best:.4g}" if best is not None and math.isfinite(best) else "n/a"
            stops = [e for e in engine.events if e.kind == "stop"]
            where = stops[-1].data.get("where") if stops else None
            why = f" (KeyboardInterrupt raised at {where})" if where else ""
            print(f"run {engine.run_id} {state}{why}: {engine.step} steps, best loss {best_txt}{extra}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted else 0
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


def load_script(ref: str) -> Any:
    """The experiment at ``ref`` (a .py file or a built-in example's name); a file that is not a
    Python script is refused with a message, not imported."""
    from .experiment import load_experiment

    path = Path(ref)
    if path.is_file() and path.suffix != ".py":
        raise ScriptError("not a Python script: lrviz runs an experiment script, a .py file with build_model() "
                          "and build_data() (see the README, \"Your model: the experiment script\")", ref)
    return load_experiment(ref)


def check_at_steps(texts: Sequence[str], ats: Sequence[Any], steps: int | None) -> None:
    """Refuse an ``--at`` at or past the last step of a run of known length: it would never apply."""
    if steps is None:
        return
    for text, at in zip(texts, ats):
        if at.step >= steps:
            raise ConfigError(f"--at {text!r}: step {at.step} is past the end of the run (steps 0..{steps - 1}), "
                              "so it would never apply; give a step below --steps")


def _note_unapplied(texts: Sequence[str], ats: Sequence[Any], engine: Any) -> None:
    """After a run of epochs (whose length was not known up front), name the ``--at`` it never reached."""
    if engine.state != "finished":
        return
    for text, at in zip(texts, ats):
        if at.step >= engine.step:
            print(f"lrviz: note: --at {text!r} was not applied: the run ended after step {engine.step - 1}",
                  file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from .engine import TrainingEngine
    from .interventions import parse_at

    exp = load_script(args.script)
    ats = [parse_at(a) for a in args.at]
    own_ats = list(ats)
    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        store.require_writable()
        origin = None
        if args.fork:
            origin, ats = fork_origin(store, args.fork, args, ats)
            cfg = config_from_args(exp, args, base=store.get_run(origin.run_id).config)
        else:
            cfg = config_from_args(exp, args)
        check_at_steps(args.at, own_ats, cfg.steps)
        engine = TrainingEngine(exp, cfg, store, interventions=ats, name=args.name, origin=origin,
                                distributed=getattr(args, "distributed", None))
        with _serving(engine, store, args):
            train_headless(engine, args.quiet)
        status = finish_run(engine, store, out, args.quiet)
        _note_unapplied(args.at, own_ats, engine)
        return status
    finally:
        store.close()


def _serving(engine: Any, store: Any, args: argparse.Namespace) -> Any:
    """Serve the run live while it trains (a local socket; also TCP with --listen)."""
    from .live.serve import serving

    if cfg_pauses(engine) and not args.quiet:
        engine.on_open.append(lambda run_id: print(
            f"lrviz: run {run_id} pauses if it diverges; steer it with `lrviz steer {run_id} --rollback --resume` "
            f"(or --lr X --resume, or --stop)", file=sys.stderr, flush=True))
    return serving(engine, store, listen=getattr(args, "listen", None), announce=getattr(args, "listen", None) is not None)


def cfg_pauses(engine: Any) -> bool:
    return engine.config.divergence == "pause"


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
    parent.require_trainable("forked")
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
    if getattr(args, "clip_grad_norm", None) is not None:  # the checkpoint holds the parent's threshold
        extra.append(Intervention(step, "set_clip", check("set_clip", {"clip_grad_norm": args.clip_grad_norm})))
    return Origin("fork", parent.id, Path(points[step]), step), extra + ats


def cmd_resume(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .engine import Origin, TrainingEngine
    from .experiment import load_experiment

    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        info = store.get_run(args.run)
        info.require_trainable("resumed")
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
        engine = TrainingEngine(exp, cfg, store, origin=Origin("resume", info.id, Path(points[step]), step),
                                distributed=getattr(args, "distributed", None))
        print(f"resuming run {info.id} from its checkpoint at step {step}", file=sys.stderr)
        with _serving(engine, store, args):
            train_headless(engine, args.quiet)
        return finish_run(engine, store, out, args.quiet)
    finally:
        store.close()


def replay_origin(store: Any, info: Any) -> Any:
    """Where a replay of run ``info`` starts: a fork child from its parent's checkpoint at the fork
    step (as the child did), any other run from step 0 (None)."""
    from .engine import Origin

    if info.parent_id is None or info.fork_step is None:
        return None
    points = checkpoint_events(store, info.parent_id)
    if info.fork_step not in points:
        raise ConfigError(f"run {info.id} is a fork of run {info.parent_id} at step {info.fork_step}, and that "
                          "checkpoint is gone: the fork cannot be replayed")
    return Origin("fork", info.parent_id, Path(points[info.fork_step]), info.fork_step)


def cmd_replay(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .engine import TrainingEngine
    from .experiment import load_experiment
    from .interventions import from_events

    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        info = store.get_run(args.run)
        info.require_trainable("replayed")
        exp = load_experiment(info.script_path)
        if exp.source_hash != info.script_hash:
            print(f"lrviz: warning: {info.script_path} changed since run {info.id}; the replay may differ",
                  file=sys.stderr)
        cfg = RunConfig.from_dict(info.config)
        origin = replay_origin(store, info)
        first = origin.step if origin is not None else 0
        if info.steps:
            cfg.steps, cfg.epochs = first + info.steps, None  # exactly as many steps as the original ran
        events = store.load_events(info.id)
        engine = TrainingEngine(exp, cfg, store, interventions=from_events(events), origin=origin,
                                name=f"replay of {info.name}", distributed=getattr(args, "distributed", None))
        with _serving(engine, store, args):
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
        from .live.connection import live_runs

        live = live_runs(store.path)
        print(f"{'id':>4}  {'name':<28} {'status':<11} {'steps':>8} {'best loss':>10} {'final loss':>10}  "
              f"{'started':<16}  live")
        for r in runs:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at or r.created_at))
            best = f"{r.best_loss:.4g}" if r.best_loss is not None else "-"
            final = f"{r.final_loss:.4g}" if r.final_loss is not None else "-"
            mark = "imported" if r.kind == "imported" else ""
            if r.id in live:
                info = live[r.id]
                mark = "live" + (f" {info.address}:{info.port}" if info.transport == "tcp" else "")
            print(f"{r.id:>4}  {r.name[:28]:<28} {r.status:<11} {r.steps:>8} {best:>10} {final:>10}  "
                  f"{started:<16}  {mark}".rstrip())
        return 0
    finally:
        store.close()


def cmd_steer(args: argparse.Namespace) -> int:
    """Send each steering flag to a live run, in order; print what each was answered."""
    from .interventions import check
    from .live.run import CommandRejected, NotLive
    from .live.steer import ack_phrase, command_words, connect_to

    actions = list(args.actions or [])
    if args.lr_factor is not None:
        if not any(kind == "rollback" for kind, _ in actions):
            raise ConfigError("--lr-factor goes with --rollback")
        actions = [(k, {"lr_factor": args.lr_factor} if k == "rollback" else d) for k, d in actions]
    if not actions:
        raise ConfigError("nothing to do: give at least one of --lr, --schedule, --momentum, --weight-decay, "
                          "--clip-grad-norm, --pause, --resume, --step-once, --stop, --checkpoint, --rollback")
    try:
        timeout = float(args.timeout)
    except ValueError:
        raise ConfigError(f"--timeout must be a number of seconds, not {args.timeout!r}") from None
    for kind, data in actions:  # refuse a bad value here, before anything is sent
        if kind in ("set_lr", "set_schedule", "set_hyperparams", "set_clip", "rollback"):
            check(kind, data)
    client, label = connect_to(args.run, store_path=args.store, token=args.token)
    refused = 0
    try:
        for kind, data in actions:
            what = command_words(kind, data)
            try:
                ack = client.command(kind, data).result(timeout)
            except CommandRejected as exc:
                refused += 1
                print(f"{what}: refused: {exc}")
                continue
            except TimeoutError:
                refused += 1
                print(f"{what}: no answer within {timeout:g} s (the run may be busy in a long step or validation)")
                continue
            except NotLive as exc:
                print(f"{what}: {exc}")
                return 1
            print(f"{what}: accepted: {ack_phrase(kind, ack)}")
    finally:
        client.close()
    print(f"({label})", file=sys.stderr)
    return 1 if refused else 0


def _load_plots() -> None:
    """The composition root loads the app's renderer (Qt) for plot exports; it registers itself."""
    try:
        import lrviz.ui.render  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"plot export needs PySide6 and pyqtgraph ({exc}); install them "
                          "(pip install PySide6-Essentials pyqtgraph) or export only csv and json "
                          "(--format csv,json)") from None


def cmd_export(args: argparse.Namespace) -> int:
    from .export import IMAGE_FORMATS, export_run

    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    if any(f in IMAGE_FORMATS for f in formats):
        _load_plots()
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


def cmd_import(args: argparse.Namespace) -> int:
    from .tensorboard import import_logs

    lr = [t.strip() for t in args.lr.split(",") if t.strip()] if args.lr is not None else None
    store = open_store(args.store)
    try:
        made, notes = import_logs(store, os.path.abspath(os.path.expanduser(args.dir)), name=args.name,
                                  loss=args.loss, lr=lr, partial=args.partial)
    finally:
        store.close()
    for note in notes:
        print(f"lrviz: note: skipped {note}", file=sys.stderr)
    for m in made:
        steps = m.steps
        span = f"steps {steps[0]}..{steps[-1]}" if len(steps) else "no steps"
        print(f"imported run {m.run_id} '{m.name}' from {m.folder} "
              f"({m.files} event file{'s' if m.files != 1 else ''}): {len(steps):,} steps ({span})")
        also = f" (also like a loss: {', '.join(m.other_loss_tags)}; choose with --loss TAG)" if m.other_loss_tags else ""
        print(f"  loss  <- {m.loss_tag!r}{also}")
        print(f"  lr    <- {', '.join(repr(t) for t in m.lr_tags)}" if m.lr_tags
              else "  lr    <- no learning-rate tag (name one with --lr TAG)")
        if m.scalar_tags:
            print(f"  extra scalar series: {', '.join(m.scalar_tags)}")
        if m.replaced:
            print(f"  {m.replaced} points were logged again at a step already logged: the last one is kept")
        if m.damage:
            print(f"  --partial: {m.damage}; what comes before it was imported")
    return 0


def cmd_find_lr(args: argparse.Namespace) -> int:
    import json

    from .experiment import load_experiment
    from .export import atomic_write
    from .lab.rangetest import find_lr, write_csv

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
    from .lab.sweep import command

    return command(args, plot=_plot_overlay)


def across_ranks(args: argparse.Namespace) -> int:
    """``torchrun ... -m lrviz run|resume|replay``: join the job; rank 0 runs the command (it records and
    serves the run), the other ranks follow it."""
    from .distributed import Distributed, follow, terminable

    dist = Distributed.from_env(getattr(args, "device", None))
    try:
        with terminable(dist):  # SIGTERM (torchrun stopping the job): the ranks stop together, the run is saved
            if not dist.is_main:
                return follow(dist)
            args.distributed = dist
            if getattr(args, "listen", None):  # the node to tunnel to: rank 0 serves the run
                print(f"lrviz: rank 0 of {dist.world_size} runs on {socket.gethostname()}", file=sys.stderr,
                      flush=True)
            return HANDLERS[args.command](args)
    except LrvizError as exc:  # the others hear it (a failure before training, too)
        dist.report(exc)
        raise
    finally:
        dist.mark_recorded()
        dist.close()


def launched() -> bool:
    """Whether torchrun (or another launcher setting its environment) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


#: The commands that train across the ranks of a torchrun job.
DISTRIBUTED_COMMANDS = ("run", "resume", "replay")

HANDLERS = {"run": cmd_run, "find-lr": cmd_find_lr, "sweep": cmd_sweep, "replay": cmd_replay, "resume": cmd_resume,
            "runs": cmd_runs, "export": cmd_export, "import": cmd_import, "steer": cmd_steer}


def _app(argv: list[str]) -> int:
    p = _Parser(prog="lrviz", description="Open the lrviz desktop app "
                                f"(headless commands: {', '.join(COMMANDS)}; see lrviz COMMAND --help).")
    p.add_argument("script", nargs="?", help="experiment script to open (default: the built-in example)")
    _common(p)
    args = p.parse_args(argv)
    _logging(args.debug)
    _absolute_paths(args)
    try:
        from lrviz.ui.app import run_app
    except ImportError as exc:
        raise ConfigError(f"the desktop app needs PySide6 and pyqtgraph ({exc}); headless commands still work: "
                          "lrviz run SCRIPT.py") from None
    return run_app(args.script, args.store)


def _logging(debug: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter(debug))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])


def _unknown_command(word: str) -> UsageError | None:
    """A UsageError when ``lrviz WORD`` names neither a command nor a script (a file, or a built-in
    example), so that a typo says so instead of opening the app."""
    if word.startswith("-") or os.sep in word or "/" in word or word.endswith(".py") or Path(word).exists():
        return None
    from .examples import examples_dir

    if (examples_dir() / f"{word}.py").is_file():
        return None
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f" (did you mean `lrviz {close[0]}`?)" if close else ""
    return UsageError(f"unknown command {word!r}{hint}; the commands are {', '.join(COMMANDS)}, and "
                      "`lrviz SCRIPT.py` opens the app with a script (see `lrviz --help`)")


def _absolute_paths(args: argparse.Namespace) -> None:
    """Resolve ``--store`` (or its default), ``--out`` and a script path once, against the folder the
    command was started in."""
    from .store.runs import RunStore

    if hasattr(args, "store"):
        args.store = str(RunStore.resolve_path(args.store))
    if getattr(args, "out", None) is not None:
        args.out = os.path.abspath(os.path.expanduser(args.out))
    script = getattr(args, "script", None)
    if script is not None and Path(script).expanduser().exists():
        args.script = os.path.abspath(os.path.expanduser(script))


_WORD = re.compile(rf"\S{{{ECHO_LIMIT + 1},}}")


def clip(text: str) -> str:
    """``text`` with every word longer than ECHO_LIMIT shortened to its start and end and its length."""

    def short(m: re.Match[str]) -> str:
        w = m.group(0)
        return f"{w[:ECHO_LIMIT // 2]}…{w[-20:]} ({len(w):,} characters)"

    return _WORD.sub(short, text)


class _LogFormatter(logging.Formatter):
    """Log lines with the exception's one-line message instead of its traceback (unless --debug)."""

    def __init__(self, debug: bool):
        super().__init__("lrviz: %(levelname)s: %(message)s")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        if self.debug or not record.exc_info:
            return clip(super().format(record))
        exc = record.exc_info[1]
        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return clip(f"{super().format(plain)}: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lrviz`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--at -1:lr=0.1` would read as an option to argparse; glue values to their flag
    for i in range(len(argv) - 1, 0, -1):
        if argv[i - 1] == "--at" and argv[i].startswith("-"):
            argv[i - 1:i + 1] = [f"--at={argv[i]}"]
    debug = "--debug" in argv
    if argv[:1] == ["worker"]:  # the app's training process (private: stdin/stdout are its pipe)
        from .live.worker import main as worker_main

        return worker_main(argv[1:])
    try:
        with Interrupts().installed():
            if argv and argv[0] in HANDLERS:
                args = build_parser().parse_args(argv)
                _logging(args.debug)
                _absolute_paths(args)
                if launched():
                    if args.command in DISTRIBUTED_COMMANDS:
                        return across_ranks(args)
                    if args.command in ("find-lr", "sweep"):
                        raise ConfigError(f"`lrviz {args.command}` trains in one process; under torchrun, use "
                                          f"lrviz {', '.join(DISTRIBUTED_COMMANDS)}")
                return HANDLERS[args.command](args)
            if argv and argv[0] in COMMANDS:
                raise ConfigError(f"`lrviz {argv[0]}` is not available in this version")
            unknown = _unknown_command(argv[0]) if argv else None
            if unknown is not None:
                raise unknown
        return _app(argv)
    except LrvizError as exc:
        if debug:
            raise
        print(f"lrviz: error: {clip(str(exc))}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("lrviz: interrupted (Ctrl+C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug of lrviz: still one line, the traceback behind --debug
        if debug:
            raise
        print(f"lrviz: error: internal error in lrviz: {type(exc).__name__}: {clip(str(exc))} "
              "(please report it; --debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
