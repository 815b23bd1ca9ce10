"""Run control: the window's runs, each in a process of its own, and what the buttons ask of them.

Start sends a run spec to a worker of the app's :class:`~lrviz.live.child.WorkerPool` and shows
the :class:`~lrviz.live.child.ChildRun` it becomes; Watch and "Connect to a run…" attach a
:class:`~lrviz.live.run.RemoteRun` to a run some other process trains. Either way the plots and
the status bar read the one :class:`~lrviz.live.run.Run` interface, from the window's timer.
Every command (pause, resume, step once, stop, a new rate, schedule, momentum) returns a Future of
its ack; the answer is handed to the GUI thread and shown: "lr 0.01 from step 1,234", or the reason
it was refused. Runs this app started are remembered: closing asks whether to stop them or leave
them running, and the next start attaches to those it left running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QMessageBox

from lrviz.config import RunConfig
from lrviz.errors import ConfigError, LrvizError
from lrviz.live.client import CommandRejected
from lrviz.live.connection import ConnectionInfo, find_live
from lrviz.live.run import RemoteRun
from lrviz.live.steer import ack_phrase, command_words
from lrviz.states import EventKind, RunState, is_terminal

from .futures import GuiFutures
from .trace import RunTrace
from .widgets import format_number

if TYPE_CHECKING:
    from lrviz.live.child import ChildRun
    from lrviz.live.run import Run

    from .main_window import MainWindow

log = logging.getLogger(__name__)

CONTEXT_EVERY_S = 1.0  # the schedule preview's starting point, mid-run
RUNS_REFRESH_S = 5.0  # the run browser's list, while a run is live
#: How long closing the app waits for the runs it was asked to stop (a hung one is killed in ~4 s).
CLOSE_WAIT_S = 10.0


class RunControl(QObject):
    """The shown run, the runs this app started, and the commands sent to them.

    Signals: ``runChanged(run_or_None)`` when another run is shown; ``runEnded(state)`` when the
    shown run has ended (its process exited, or the watched run sent its end).
    """

    runChanged = Signal(object)
    runEnded = Signal(str)

    def __init__(self, window: MainWindow):
        super().__init__(window)
        self.window = window
        self.run: Run | None = None
        #: Runs this app started to show (or re-attached after it left them running): closing asks about
        #: the live ones.
        self.started: list[Run] = []
        #: Runs a panel started for itself (``show=False``): the panel stops them; closing stops what is left.
        self.hidden: list[Run] = []
        #: The schedule a run started now would use (applied before the start, or the script's).
        self.start_schedule: str | None = None
        #: What each command was answered, in order ("lr 0.01 from step 1,234", "... refused: why").
        self.answers: list[str] = []
        self.spec_hooks: list[Callable[[dict[str, Any]], Any]] = []
        self.futures = GuiFutures(self)
        self._end_handled = True
        self._pause_asked = False
        self._listed = False
        self._runs_at = self._context_at = 0.0
        self._attaching = 0

    # ---- state -------------------------------------------------------------------------------------
    def active(self) -> bool:
        """Whether the shown run is still going (its end not yet seen)."""
        return self.run is not None and not self._end_handled

    def paused(self) -> bool:
        """The shown run is paused, or will be before its next step (asked here or by anyone else)."""
        run = self.run
        return self.active() and (run.state == RunState.PAUSED or bool(run.pause_requested)  # type: ignore[union-attr]
                                  or self._pause_asked)

    def busy(self) -> bool:
        """Anything the timer must keep watching: the shown run, an attach or an answer on its way."""
        return self.active() or self._attaching > 0 or self.futures.pending > 0

    def live_started(self) -> list[Run]:
        """The runs this app started that are still going."""
        self.started = [r for r in self.started if not r.done.is_set()]
        return list(self.started)

    # ---- starting and showing ----------------------------------------------------------------------
    def start(self, paused: bool = False) -> bool:
        """Start the loaded script with the controls' settings (``paused``: one step, then paused)."""
        w = self.window
        if w.script_info is None or self.active():
            return False
        try:
            cfg = w.config()
            spec = w.run_spec(cfg, start_paused=paused)
            for hook in self.spec_hooks:
                hook(spec)
            cfg = RunConfig.from_dict(spec["config"]).validated()
            spec["config"] = cfg.to_dict()
        except LrvizError as exc:
            if not isinstance(exc, ConfigError) or "load a script" not in str(exc):
                w.controls.config_errors.show_error(str(exc))
            w.show_status(f"cannot start: {exc}", 10000)
            return False
        run = self.start_run(spec, show=True)
        w.show_status(f"starting {w.script_info.path.name}: {cfg.optimizer} lr={format_number(cfg.lr)}"
                      + (f", {cfg.schedule}" if cfg.schedule else ""))
        if paused:
            self._pause_asked = True
            self.send(run, "step once", run.step_once(), "step_once")
            w.update_actions()
        return True

    def start_run(self, spec: dict[str, Any], *, show: bool = True) -> ChildRun:
        """Train ``spec`` in a worker of the app's pool; ``show``: it becomes the shown run (else the
        caller follows it and stops it)."""
        run = self.window.pool.start_run(spec)
        if show:
            self.started.append(run)
            self.show(run, "this run")
        else:
            self.hidden = [r for r in self.hidden if not r.done.is_set()] + [run]
        self.window.wake()
        return run

    def show(self, run: Run, label: str = "") -> None:
        """Draw ``run`` live (from its history on) and steer it with the controls."""
        w = self.window
        old = self.run
        if old is not None and old is not run and old not in self.started:
            old.close()  # a run we only watched: detach (it goes on)
        self.run = run
        self._end_handled = False
        self._pause_asked = False
        self._listed = False
        w.view_label.setText("")
        trace = RunTrace(lambda: run.buffer, run.events, run.validation, label=label or run.name or "this run",
                         smoothing=w.plots.smoothing, live=True, run_id=run.run_id)
        w.plots.set_primary(trace)
        w.plots.set_hint("")
        w.keep_overlays()
        w.controls.set_running(True)
        w.status.clear()
        w.status.update(run, force=True)
        w.wake()
        w.update_actions()
        self.runChanged.emit(run)

    def forget(self) -> None:
        """Show no run any more (a stored run is opened, or another script): a watched one is detached."""
        run = self.run
        if run is None:
            return
        if run not in self.started:
            run.close()
        self.run = None
        self._end_handled = True
        self.runChanged.emit(None)

    # ---- attaching ---------------------------------------------------------------------------------
    def attach(self, info: ConnectionInfo, label: str, *, started_here: bool = False, show: bool = True,
               what: str = "Cannot watch the run") -> None:
        """Connect to a live run (in the background) and show it from its first step on."""
        fut: Future = Future()

        def connect() -> None:
            try:
                fut.set_result(RemoteRun(info, name="app").connect())
            except BaseException as exc:  # noqa: BLE001 - shown to the person who asked
                fut.set_exception(exc)

        self._attaching += 1
        threading.Thread(target=connect, name="lrviz-attach", daemon=True).start()
        self.futures.when_done(fut, lambda f: self._on_attached(f, label, started_here, show, what))
        self.window.wake()

    def _on_attached(self, fut: Future, label: str, started_here: bool, show: bool, what: str) -> None:
        self._attaching -= 1
        w = self.window
        exc = fut.exception()
        if exc is not None:
            w.show_message(QMessageBox.Icon.Warning, what, str(exc))
            return
        run: RemoteRun = fut.result()
        if w.closed:
            run.close()
            return
        if started_here:
            self.started.append(run)
        if show:
            self.show(run, run.name or label)
            w.show_status(f"watching {label}: {run.state} at step {run.step:,}")
            self._show_settings_of(run)

    def _show_settings_of(self, run: Run) -> None:
        """A run started elsewhere: its script in the Script panel (when it is on this machine) and its
        settings in the controls, so what they show is what it trains with."""
        w = self.window
        if getattr(run, "describe", {}).get("kind") == "tracked":
            self._show_tracked_settings(run)  # its script is the user's own loop: never imported here
            return
        script = run.script_path
        info = w.script_info
        if script and os.path.isfile(script) and (info is None or os.path.realpath(info.path) !=
                                                  os.path.realpath(script)):
            w.load_script(script)  # the controls then show its settings again, below
        if w.script_info is not None:
            self.script_loaded(w.script_info)

    def _show_tracked_settings(self, run: Run) -> None:
        """A user's loop (``lrviz.track``, a trainer's callback): the controls show the rate, momentum,
        weight decay and length it recorded at its start; what it has no word for keeps the defaults."""
        known = {f.name for f in fields(RunConfig)}
        recorded = dict(run.config)
        cfg = {k: v for k, v in recorded.items() if k in known}
        if "momentum" not in cfg and isinstance(recorded.get("betas"), (list, tuple)) and recorded["betas"]:
            cfg["momentum"] = recorded["betas"][0]  # Adam's beta1: what lrviz's momentum sets for Adam
        try:
            self.window.controls.show_config(RunConfig.from_dict(steered_config(run, cfg)))
        except (LrvizError, TypeError, ValueError):
            pass

    def watch(self, run_id: int) -> None:
        """Follow run ``run_id`` of the window's store, live (Watch in the run browser)."""
        w = self.window
        for r in self.live_started():  # a run this app started: it is still connected
            if r.run_id == run_id:
                if r is not self.run:
                    self.show(r, r.name)
                return
        info = find_live(w.store_path, run_id) if w.store_path else None
        if info is None:
            w.show_message(QMessageBox.Icon.Information, "Watch a run",
                           f"Run #{run_id} is not live any more; open it to see what it recorded.")
            w.refresh_runs()
            return
        self.attach(info, f"run #{run_id}")

    def reattach(self) -> None:
        """Attach to the runs this app left running when it closed last (the newest is shown)."""
        w = self.window
        prefs = w.prefs
        others, found = [], []
        for store, run_id in prefs.left_running():
            if store != w.store_path:
                others.append((store, run_id))
                continue
            info = find_live(store, run_id)
            if info is not None:
                found.append((run_id, info))
        prefs.set_left_running(others)  # attached again: asked about again when the app closes
        found.sort()
        for i, (run_id, info) in enumerate(found):
            self.attach(info, f"run #{run_id}", started_here=True, show=i == len(found) - 1)

    def script_loaded(self, info: Any) -> None:
        """The controls were filled from a script's DEFAULTS: while a run of that script is shown, they
        show its settings instead."""
        run = self.run
        if self.active() and run is not None and run.script_path and \
                os.path.realpath(run.script_path) == os.path.realpath(info.path):
            try:
                self.window.controls.show_config(RunConfig.from_dict(steered_config(run, dict(run.config))))
            except (LrvizError, TypeError, ValueError):
                return
            steered = [e for e in list(run.events) if e.kind == EventKind.SET_CLIP]
            if steered:  # clipping is steered: the threshold in force now, not the one it started with
                last = steered[-1]
                clip = last.data.get("clip_grad_norm")
                self.window.controls.show_clip(clip, f"{command_words('set_clip', last.data, format_number)} "
                                                     f"from step {last.step}")

    # ---- commands ----------------------------------------------------------------------------------
    def send(self, run: Run, words: str, fut: Future, kind: str, *,
             on_ok: Callable[[dict[str, Any]], Any] | None = None,
             on_refused: Callable[[str], Any] | None = None) -> None:
        """Show what ``fut`` (a command's ack) says once it arrives: the step it takes effect at, or why not."""

        def answered(f: Future) -> None:
            exc = f.exception()
            if exc is None:
                text = f"{words} {ack_phrase(kind, f.result(), number=format_number)}"
                if on_ok is not None:
                    on_ok(f.result())
            elif isinstance(exc, CommandRejected):
                text = f"{words} refused: {exc}"
                if on_refused is not None:
                    on_refused(str(exc))
            else:
                text = f"{words}: {exc}"
            self.answers.append(text)
            self.window.show_status(text, 10000)
            self.window.update_actions()

        self.futures.when_done(fut, answered)
        self.window.wake()

    def _steer(self, words: str, kind: str, call: Callable[[Run], Future], **handlers: Any) -> bool:
        run = self.run
        if not self.active() or run is None:
            return False
        self.send(run, words, call(run), kind, **handlers)
        return True

    def toggle_pause(self) -> None:
        if not self.active():
            self.start()
        elif self.paused():
            self.resume()
        else:
            self.pause()
        self.window.update_actions()

    def pause(self) -> None:
        """Pause the shown run before its next step."""
        def answered(ack: dict[str, Any]) -> None:
            self._pause_asked = False  # the run says so itself from now on

        if self._steer("pause", "pause", lambda r: r.pause(), on_ok=answered):
            self._pause_asked = True
            self.window.show_status("pausing before the next step")

    def resume(self) -> None:
        """Resume the shown run."""
        if self._steer("resume", "resume", lambda r: r.resume()):
            self._pause_asked = False

    def step_once(self) -> None:
        """One step, then paused (a new run when none is going)."""
        if self.active():
            self._pause_asked = True
            self._steer("step once", "step_once", lambda r: r.step_once())
        else:
            self.start(paused=True)

    def stop(self) -> None:
        """Stop the shown run (a run of this app that does not answer is terminated, then killed)."""
        if self._steer("stop", "stop", lambda r: r.stop()):
            self.window.show_status("stopping…")

    def set_lr(self, lr: float) -> None:
        w = self.window
        words = command_words("set_lr", {"lr": lr}, format_number)
        if not self._steer(words, "set_lr", lambda r: r.set_lr(lr), on_refused=w.controls.lr.show_error):
            w.show_status(f"learning rate {format_number(lr)} at the start")
            w.preview_setup()

    def set_schedule(self, spec: str) -> None:
        w = self.window
        text = spec or None
        editor = w.controls.schedule
        shown = text or "none (constant rate)"

        def in_force(ack: dict[str, Any]) -> None:
            editor.set_status(f"In force from step {ack.get('step')}: {shown}")

        if self._steer(command_words("set_schedule", {"spec": text}), "set_schedule", lambda r: r.set_schedule(text),
                       on_ok=in_force, on_refused=editor.show_error):
            editor.set_status(f"Asked for from the next step: {shown}")
        else:
            self.start_schedule = text
            self.show_start_schedule()
            w.show_status(f"schedule at the start: {text or 'none'}")

    def show_start_schedule(self) -> None:
        self.window.controls.schedule.set_status(f"At the start: {self.start_schedule or 'none (constant rate)'}")

    def set_hyperparams(self, values: dict[str, float]) -> None:
        controls = self.window.controls

        def refused(reason: str) -> None:
            field = controls.momentum if "momentum" in reason else controls.weight_decay
            field.set_error(reason)

        self._steer(command_words("set_hyperparams", values, format_number), "set_hyperparams",
                    lambda r: r.set_hyperparams(**values), on_refused=refused)

    def set_clip(self, clip: float | None) -> None:
        """Clip the shown run's gradient norm to ``clip`` (None: stop clipping) from its next step."""
        controls = self.window.controls
        words = command_words("set_clip", {"clip_grad_norm": clip}, format_number)

        def in_force(ack: dict[str, Any]) -> None:
            controls.clip_status.setText(f"{words} {ack_phrase('set_clip', ack)}")
            controls.clip_status.show()

        if self._steer(words, "set_clip", lambda r: r.set_clip(clip), on_ok=in_force,
                       on_refused=controls.clip.set_error):
            controls.clip_status.setText(f"{words}: asked for from the next step")
            controls.clip_status.show()

    # ---- the timer ---------------------------------------------------------------------------------
    def tick(self) -> None:
        """Called by the window's timer: the shown run's figures, its end, the run list."""
        run = self.run
        if run is None or self._end_handled:
            return
        w = self.window
        if w.status.update(run):
            w.update_actions()
        now = time.monotonic()
        state = run.state
        if state in (RunState.RUNNING, RunState.PAUSED) and now - self._context_at >= CONTEXT_EVERY_S:
            self._context_at = now
            total = run.total_steps
            w.controls.schedule.set_context(list(run.lrs) or [0.01], run.step,
                                            None if total is None else max(1, total - run.step))
        primary = w.plots.primary
        if run.run_id is not None and primary is not None and primary.trace.run_id is None:
            primary.trace.run_id = run.run_id
        if run.run_id is not None and (not self._listed or now - self._runs_at >= RUNS_REFRESH_S):
            self._listed = True  # listed as soon as it exists, then its steps every few seconds
            self._runs_at = now
            w.refresh_runs()
        if run.done.is_set():
            self._on_ended(run)

    def _on_ended(self, run: Run) -> None:
        w = self.window
        self._end_handled = True
        self._pause_asked = False
        w.plots.refresh(force=True)
        lost = getattr(run, "lost", None)
        if lost and not is_terminal(run.state):
            w.status.set_state("disconnected")
            w.show_status(f"lost the connection to {run.name or 'the run'}: {lost}", 15000)
        else:
            w.status.update(run, force=True)
        w.controls.set_running(False)
        w.update_actions()
        w.preview_setup()
        self.show_start_schedule()
        summary = run.summary()
        name = f"run #{run.run_id}" if run.run_id is not None else "the run"
        final = summary.get("final_loss")
        tail = f", final loss {format_number(final, 4)}" if isinstance(final, float) else ""
        if run.state == RunState.FAILED and run.run_id is None:  # refused before a run was made (fp16 on a CPU)
            w.show_message(QMessageBox.Icon.Warning, "The run did not start",
                           f"{run.error}\n\nNothing was stored; change the setting and start again.",
                           run.error_detail)
        elif run.state == RunState.FAILED:
            w.show_message(QMessageBox.Icon.Critical, "Training failed",
                           f"{run.error}\n\nThe run was saved as failed; the app keeps running.", run.error_detail)
        elif run.state == RunState.DIVERGED:
            w.show_message(QMessageBox.Icon.Warning, "Training diverged",
                           f"{run.error}\n\nTraining was stopped at step {run.step}; lower the "
                           "learning rate and start again.", run.error_detail)
        if not lost or is_terminal(run.state):
            w.show_status(f"{name} {run.state} after {run.step:,} steps{tail}", 15000)
        w.refresh_runs()
        self.runEnded.emit(str(run.state))

    # ---- closing -----------------------------------------------------------------------------------
    def ask_on_close(self) -> bool:
        """Runs this app started that still train: Stop them, or Leave them running (attached to again
        at the next start)? False when the person cancels. Runs it only watched are not asked about."""
        mine = self.live_started()
        if not mine:
            return True
        n = len(mine)
        them = "them" if n > 1 else "it"
        box = QMessageBox(QMessageBox.Icon.Question, "Runs are training",
                          f"{n} run{'s' if n > 1 else ''} started here {'are' if n > 1 else 'is'} still training."
                          f"\n\nStop {them} (saved in the run store), or leave {them} running? lrviz watches "
                          f"{them} again when it next starts.", parent=self.window)
        box.setObjectName("closeQuestion")
        stop = box.addButton("Stop", QMessageBox.ButtonRole.DestructiveRole)
        leave = box.addButton("Leave running", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(leave)
        box.exec()
        if box.clickedButton() is stop:
            self.stop_and_wait(mine)
        elif box.clickedButton() is leave:
            self.leave_running(mine)
        else:
            return False
        return True

    def stop_and_wait(self, runs: list[Run], timeout: float = CLOSE_WAIT_S) -> bool:
        """Stop ``runs`` and wait until each has ended (a run of this app that hangs is killed)."""
        for r in runs:
            try:
                r.stop()
            except LrvizError:
                pass
        deadline = time.monotonic() + timeout
        for r in runs:
            r.done.wait(max(0.0, deadline - time.monotonic()))
        return all(r.done.is_set() for r in runs)

    def leave_running(self, runs: list[Run]) -> None:
        """Remember ``runs`` (to attach to them at the next start) and detach from them."""
        w = self.window
        keep = [(s, i) for s, i in w.prefs.left_running() if (s, i) not in
                {(w.store_path, r.run_id) for r in runs}]
        store = w.store_path
        left = [(str(getattr(r, "store_path", None) or store), int(r.run_id)) for r in runs if r.run_id is not None]
        w.prefs.set_left_running(keep + left)
        for r in runs:
            r.close()

    def hidden_live(self) -> list[Run]:
        """The runs panels started for themselves that are still going."""
        self.hidden = [r for r in self.hidden if not r.done.is_set()]
        return list(self.hidden)

    def detach_all(self) -> None:
        """Close every connection this window holds (the runs go on)."""
        held = [*self.started, *self.hidden, *([self.run] if self.run is not None else [])]
        for r in {id(r): r for r in held}.values():
            r.close()


def steered_config(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (what the run started with) as steered since: its current rate (group 0), and the last
    schedule, momentum and weight decay set (those its events received so far name)."""
    out = dict(cfg)
    for e in list(run.events):
        if e.kind == EventKind.SET_SCHEDULE:
            out["schedule"] = e.data.get("spec")
        elif e.kind == EventKind.SET_HYPERPARAMS:
            out.update({k: e.data[k] for k in ("momentum", "weight_decay") if e.data.get(k) is not None})
    buf = run.buffer
    if buf is not None and len(buf):  # the rate the last step used (a tracked loop's own scheduler moves it)
        out["lr"] = float(buf.view(len(buf) - 1)["lr"][-1, 0])
    elif run.lrs:
        out["lr"] = float(run.lrs[0])
    return out
