"""What the commands of the command line share: the run configuration from the options, the output
folder, the store, progress on stderr, Ctrl+C, training headless and the run's files at the end."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LrvizError, ScriptError

PROGRESS_EVERY = 2.0


#: Exit status of a command stopped with Ctrl+C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


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
    from ..config import RunConfig

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
    from ..store.runs import RunStore

    return RunStore(path)


#: The handler of the command running now (None outside ``main`` or off the main thread).
_interrupts: Interrupts | None = None


class Interrupts:
    """Ctrl+C (SIGINT) during a headless command, handled so that stopping never loses the run.

    Until training starts, Ctrl+C raises KeyboardInterrupt as usual (exit status 130). Once it has
    started (:meth:`stoppable`), the first Ctrl+C calls the ``stop`` given — the run ends at the next
    step boundary and is saved as stopped, with its ``--out`` files — and every later press until the
    command ends is absorbed with a note: a second press used to land in the middle of saving, or of
    Qt's import for the plots ("Fatal Python error"), and lose the outputs. ``FORCE_AFTER`` further
    presses quit at once, for a step that never returns; the run is then shown as interrupted, as after
    a crash. Notes are written with ``os.write``: a handler must not re-enter a buffered stream.

    While the command waits for its training thread it must :meth:`wait` (never block untimed): Python
    runs the handler in the main thread only, and a press whose C-level handler ran on another thread
    (the kernel may deliver SIGINT to any thread) or in the main thread just before it blocked in a lock
    would otherwise stay pending until the wait ends, which for a step that never returns is never.
    """

    FORCE_AFTER = 3
    #: Seconds between two looks at a pending Ctrl+C while waiting (a wake-up costs a few µs).
    POLL = 0.1

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

    @classmethod
    def wait(cls, finished: Callable[[float], bool]) -> None:
        """Wait until ``finished(timeout)`` (a timed join that returns whether it is over) says True,
        acting on any Ctrl+C within :attr:`POLL` seconds."""
        while not finished(cls.POLL):
            pass

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
                Interrupts.wait(engine.join)
        else:  # called outside main(): the default handler raises KeyboardInterrupt
            engine.start()
            try:
                Interrupts.wait(engine.join)
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
    from ..export import export_run
    from ..plugins import load_plugin

    formats = ["csv", "json"]
    try:
        load_plugin("plots")  # the plots need Qt

        formats.append("png")
    except Exception as exc:  # Qt missing or broken: the data still gets written
        print(f"lrviz: plots skipped ({exc}); metrics.csv and run.json written", file=sys.stderr)
    export_run(store, run_id, out, formats)


def load_script(ref: str) -> Any:
    """The experiment at ``ref`` (a .py file or a built-in example's name); a file that is not a
    Python script is refused with a message, not imported."""
    from ..experiment import load_experiment

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


def note_unapplied(texts: Sequence[str], ats: Sequence[Any], engine: Any) -> None:
    """After a run of epochs (whose length was not known up front), name the ``--at`` it never reached."""
    if engine.state != "finished":
        return
    for text, at in zip(texts, ats):
        if at.step >= engine.step:
            print(f"lrviz: note: --at {text!r} was not applied: the run ended after step {engine.step - 1}",
                  file=sys.stderr)
