"""The command line: the desktop app, and the same engine headless.

``lrviz`` / ``lrviz SCRIPT.py`` open the app; ``run``, ``replay``, ``runs``, ``export``, ``import`` and
the others work headless. This package is the one composition root: it imports the Qt layer lazily, only for the
app and for plot images. Its rooms: this module (the parser, the dispatch, ``main``), :mod:`.common` (what the
commands share), :mod:`.training` (run, resume, replay), :mod:`.stored` (runs, steer, export, import) and
:mod:`.lab` (find-lr, sweep).

Exit status: 0 finished, 1 the script or a setting was wrong, 2 the run diverged (or the command is
unknown: argparse's usage status), 130 stopped with Ctrl+C.

Every path (``--store``, ``--out``, the script) is made absolute once, before anything runs: a script
that changes the working folder must not move the outputs or the store's checkpoints.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LrvizError, UsageError
from .common import EXIT_INTERRUPTED, Interrupts
from .lab import cmd_find_lr, cmd_sweep
from .stored import cmd_export, cmd_import, cmd_runs, cmd_steer
from .training import cmd_replay, cmd_resume, cmd_run

log = logging.getLogger("lrviz")

COMMANDS = ("run", "replay", "resume", "runs", "export", "import", "find-lr", "sweep", "steer")
#: A message echoes at most this many characters of one word of user input (a 120 KB schedule...).
ECHO_LIMIT = 300


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a ConfigError (one message, exit status 1), not exit 2,
    which means "diverged" here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--step 50` is a typo of --steps, not a shorthand for it
        super().__init__(*args, **kwargs)

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

    from ..lab import sweep

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


def across_ranks(args: argparse.Namespace) -> int:
    """``torchrun ... -m lrviz run|resume|replay``: join the job; rank 0 runs the command (it records and
    serves the run), the other ranks follow it."""
    from ..distributed import Distributed, follow, terminable

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
    from ..plugins import load_plugin

    try:
        run_app = load_plugin("app")
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
    from ..examples import examples_dir

    if (examples_dir() / f"{word}.py").is_file():
        return None
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f" (did you mean `lrviz {close[0]}`?)" if close else ""
    return UsageError(f"unknown command {word!r}{hint}; the commands are {', '.join(COMMANDS)}, and "
                      "`lrviz SCRIPT.py` opens the app with a script (see `lrviz --help`)")


def _absolute_paths(args: argparse.Namespace) -> None:
    """Resolve ``--store`` (or its default), ``--out`` and a script path once, against the folder the
    command was started in."""
    from ..store.runs import RunStore

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
        from ..live.worker import main as worker_main

        return worker_main(argv[1:])
    if argv[:1] == ["forkserver"]:  # the app's fork server (private: its argument is its socket's fd)
        from ..live.forkserver import main as forkserver_main

        return forkserver_main(argv[1:])
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
