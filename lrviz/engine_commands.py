"""The engine's command side: what any thread may ask of a :class:`~lrviz.engine.TrainingEngine`
(pause, a new rate, a range test...), checked in the caller's thread, queued on the run's
:class:`~lrviz.control.RunControl`, and applied by the training thread between two steps.

A base class of :class:`~lrviz.engine.TrainingEngine`, apart so that the loop (lrviz/engine.py) and
the commands it obeys can each be read alone; it works on the engine's attributes (``control``,
``optimizer``, ``rates``, ``step``...) and calls its checkpoint, roll-back and range-test methods.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from . import interventions as iv
from .control import ack
from .errors import ConfigError, LrvizError
from .optim import apply_hyperparams
from .states import SETTING_COMMANDS, Command, parse_command

__all__ = ["EngineCommands"]


class EngineCommands:
    """The commands of a :class:`~lrviz.engine.TrainingEngine`: asked from any thread, applied between steps."""

    # ---- asked from any thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Train in a background thread."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self.run, name="lrviz-engine", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; True when it has."""
        return self.done.wait(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pause(self) -> None:
        """Pause before the next step (blocks the training thread on a condition, no busy loop)."""
        self.control.pause()

    def resume(self) -> None:
        """Resume a paused run (a divergence the guard reported is then considered handled)."""
        self.detection = None
        self.control.resume()

    def step_once(self) -> None:
        """Run exactly one step, then pause."""
        self.control.step_once()

    def stop(self) -> None:
        """Stop at the next step boundary (or between validation batches)."""
        self.control.stop()

    def set_pace(self, steps_per_second: float | None) -> None:
        """Slow motion: at most this many steps a second (None or 0: full speed). Takes effect at once."""
        self.control.set_pace(steps_per_second)

    def set_lr(self, lr: Any) -> None:
        """Use ``lr`` from the next step on (a running schedule is rescaled to continue from it)."""
        self.control.enqueue("set_lr", self._checked("set_lr", {"lr": lr}))

    def set_schedule(self, spec: str | None) -> None:
        """Start schedule ``spec`` at the next step, from the current rate (None: constant rate)."""
        self.control.enqueue("set_schedule", self._checked("set_schedule", {"spec": spec}))

    def set_hyperparams(self, momentum: float | None = None, weight_decay: float | None = None) -> None:
        """Change momentum (beta1 for Adam-like optimizers) and/or weight decay from the next step on."""
        self.control.enqueue("set_hyperparams", self._checked("set_hyperparams", {
            "momentum": momentum, "weight_decay": weight_decay}))

    def set_clip(self, clip_grad_norm: float | None) -> None:
        """Clip the gradient norm to ``clip_grad_norm`` from the next step on (None: stop clipping)."""
        self.control.enqueue("set_clip", self._checked("set_clip", {"clip_grad_norm": clip_grad_norm}))

    def rollback(self, lr_factor: float = 0.1, checkpoint: str | Path | None = None) -> None:
        """Restore the last good checkpoint's weights and optimizer state and continue with LR x ``lr_factor``.

        Steps keep counting forward (the plot shows the jump back); recorded as a 'rollback' event.
        """
        data: dict[str, Any] = {"lr_factor": lr_factor}
        if checkpoint is not None:
            data["path"] = str(checkpoint)
        self.control.enqueue("rollback", self._checked("rollback", data))

    def range_test(self, **kwargs: Any) -> Future:
        """Run the LR range test on the current weights between two steps (best while paused).

        Keyword arguments go to :func:`lrviz.lab.rangetest.range_test` (start, end, steps, beta,
        stop_factor); its steps are made as the run's (mixed precision, accumulation, the clipping in
        force) unless they say otherwise. Model, optimizer and RNG are restored exactly afterwards.
        Returns a Future holding the RangeTestResult; ``range_test_progress`` fills with (lr, loss)
        while it runs.
        """
        return self._lab_command("range_test", kwargs)

    def confirm_lr(self, **kwargs: Any) -> Future:
        """Confirm candidate rates on the current weights between two steps, like :meth:`range_test`.

        Keyword arguments go to :func:`lrviz.lab.rangetest.confirm_rates` (rates, steps, stop_factor,
        on_step); its steps are made as the run's, as the range test's are. Model, optimizer and RNG
        are restored exactly afterwards. Returns a Future holding the Confirmation;
        :meth:`cancel_range_test` ends it early.
        """
        return self._lab_command("confirm_lr", kwargs)

    def _lab_command(self, kind: str, kwargs: dict[str, Any]) -> Future:
        fut: Future = Future()
        if self.control.closed:
            fut.set_exception(ConfigError(f"the run has ended ({self.state})"))
            return fut
        self.control.enqueue(kind, {"kwargs": kwargs, "future": fut})
        return fut

    def cancel_range_test(self) -> None:
        """Stop a running range test early (its state is restored as usual)."""
        self._range_cancel = True

    def submit(self, kind: str, data: dict[str, Any] | None = None) -> Future:
        """Ask for ``kind`` (a :class:`lrviz.states.Command`) from any thread, never blocking.

        The Future's result is the ack ``{"kind", "step", "data"}``: ``step`` is the step at which the
        command took effect (the first step run with a new setting; the step a pause or stop came
        before). A command that cannot be applied sets the Future's exception (an LrvizError with
        the reason) instead. Controls (pause, resume, step once, stop) act at once, as their
        methods do; their acks follow at the next step boundary.
        """
        fut: Future = Future()
        data = dict(data or {})
        try:
            cmd = parse_command(kind)
            if cmd in SETTING_COMMANDS:
                data = self._checked(cmd.value, data)
            elif cmd == Command.SET_PACE:
                pace = self.control.set_pace(data.get("steps_per_second"))
                fut.set_result(ack(cmd, self.step, {"steps_per_second": pace}))
                return fut
            elif cmd == Command.CANCEL_RANGE_TEST:
                self.cancel_range_test()
                fut.set_result(ack(cmd, self.step))
                return fut
            elif cmd == Command.CHECKPOINT and self._ckpts.folder is None and self.store is None:
                raise ConfigError("this run keeps no checkpoints (it is not saved in a store)")
            elif cmd in (Command.RANGE_TEST, Command.CONFIRM_LR):
                if self.dist is not None:
                    raise ConfigError("the LR range test runs in one process (lrviz find-lr SCRIPT), not across ranks")
                return self._submit_lab(cmd, data)
        except LrvizError as exc:
            fut.set_exception(exc)
            return fut
        if cmd == Command.RESUME:
            self.detection = None
        return self.control.enqueue(cmd.value, data, fut, state=lambda: str(self.state))

    def _submit_lab(self, cmd: Command, kwargs: dict[str, Any]) -> Future:
        """A range test or a confirmation whose ack carries its outcome as plain values (for a remote
        client): ``{"result": ...}`` (RangeTestResult.to_dict with its rows) or ``{"confirmation": ...}``."""
        outer: Future = Future()

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                outer.set_exception(exc)
                return
            r = f.result()
            if cmd == Command.CONFIRM_LR:
                outer.set_result(ack(cmd, self.step, {"confirmation": r.to_dict()}))
                return
            rows = {"lrs": r.lrs.tolist(), "losses": r.losses.tolist(), "smoothed": r.smoothed.tolist()}
            outer.set_result(ack(cmd, self.step, {"result": {**r.to_dict(), **rows}}))

        if cmd == Command.CONFIRM_LR:  # rates travel as [lr, source] pairs (JSON has no tuples)
            kwargs["rates"] = [tuple(r) if isinstance(r, list) else r for r in kwargs.get("rates") or ()]
            self.confirm_lr(**kwargs).add_done_callback(done)
        else:
            self.range_test(**kwargs).add_done_callback(done)
        return outer

    def _checked(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """A setting's data, validated in the caller's thread (errors reach the caller at once)."""
        data = iv.check(kind, data)
        opt = self.optimizer
        if kind == "set_hyperparams" and opt is not None:
            g = opt.param_groups[0]
            if "momentum" in data and "momentum" not in g and "betas" not in g:
                raise ConfigError(f"{type(opt).__name__} has no momentum to change")
        if kind == "set_schedule" and data["spec"] is not None and self.model is not None:
            self._check_schedule_usable(data["spec"])
        if kind == "rollback":
            # the trouble it answers, as seen now: a resume right after (the banner's "resume after
            # roll-back", `lrviz steer --rollback --resume`) clears the detection before the loop gets here
            data["detection"] = self.detection
        return data

    def _check_schedule_usable(self, spec: str, prefix: str = "") -> None:
        from .schedules import parse_schedule

        if parse_schedule(spec).stateful and self._val_data is None:
            raise ConfigError(f"{prefix}ReduceLROnPlateau steps on validation loss, and this script's build_data() "
                              "returns no validation data; return (train, val) to use it")

    # ---- applied between steps, in the training thread -----------------------------------------------
    def _attend(self) -> None:
        """Apply queued commands, wait while paused, raise Stopped on stop (see RunControl.attend)."""
        control = self.control if self.dist is None else self._staging  # across ranks: at agreed steps
        control.attend(self._apply, lambda: self.step, on_pause=self._on_pause, on_resume=self._on_resume,
                       on_reject=self._on_reject)

    def _on_pause(self) -> None:
        self._flush_device()
        self.state = "paused"
        self._event("pause", {})
        if self._ckpts.folder is not None and self.model is not None and self._ckpts.last_step != self.step:
            self._checkpoint("pause")

    def _on_resume(self) -> None:
        self.state = "running"
        self._event("resume", {})

    def _on_reject(self, kind: str, exc: LrvizError) -> None:
        self._event("rejected", {"kind": kind, "message": str(exc)})

    def _apply(self, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        """Apply an intervention now (before step ``self.step``); return what was recorded."""
        step = self.step
        if kind == "checkpoint":
            if self._ckpts.folder is None:
                raise ConfigError("this run keeps no checkpoints (it is not saved in a store)")
            info = self._checkpoint("manual")
            return {"path": str(info.path), "checkpoint_step": info.step}
        if kind in ("range_test", "confirm_lr"):
            self._run_range_test(data, kind)
            return None
        if kind == "set_lr":
            self.rates.set_lr(data["lr"], step)
        elif kind == "set_schedule":
            if data["spec"] is not None:
                self._check_schedule_usable(data["spec"])
            self.rates.set_schedule(data["spec"], step)
        elif kind == "set_hyperparams":
            apply_hyperparams(self.optimizer, data.get("momentum"), data.get("weight_decay"))
        elif kind == "set_clip":
            self._set_clip(data["clip_grad_norm"])
        elif kind == "rollback":
            data = self._rollback(data)
        self._event(kind, dict(data), step)
        return dict(data)

    def _apply_due(self) -> None:
        pending = self._pending
        while pending and pending[0].step <= self.step:
            it = pending.pop(0)
            self._apply(it.kind, it.data)
