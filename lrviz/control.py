"""Steering a training loop from other threads: commands queued, applied between two steps, acked.

:class:`RunControl` is the one meeting point of a loop and its watchers (the app, ``lrviz steer``
through the live endpoint, tests). Watchers raise a flag and queue a command, never blocking; the
loop checks one attribute per step (``attention``) and, when it is set, calls :meth:`attend`
between two steps: every queued command is applied there (each one's Future gets the step it took
effect at, or the reason it was refused), the loop waits on a condition while paused, and a stop
ends it with :class:`Stopped`. Shared by the built-in engine and ``lrviz.track``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .errors import ConfigError, LrvizError
from .states import Command

#: Controls act on flags at once; the queue only carries their acks.
CONTROL_FLAGS: dict[str, dict[str, Any]] = {
    Command.PAUSE: {"pause_requested": True},
    Command.RESUME: {"pause_requested": False, "step_budget": None},
    Command.STEP_ONCE: {"pause_requested": False, "step_budget": 1},
    Command.STOP: {"stop_requested": True},
}


class Stopped(Exception):
    """Raised in the training loop by :meth:`RunControl.attend` when a stop was requested."""


def ack(kind: str, step: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a command's Future holds when it took effect: its kind, the step, what was applied."""
    return {"kind": str(kind), "step": int(step), "data": data or {}}


def apply_commands(commands: list[tuple[str, dict[str, Any], Future | None]],
                   apply: Callable[[str, dict[str, Any]], dict[str, Any] | None], step: Callable[[], int],
                   on_reject: Callable[[str, LrvizError], None], skip: frozenset[str] = frozenset()) -> None:
    """Apply queued ``(kind, data, future)`` commands in order, between two steps. A control (pause,
    stop...) was acted on when it came: its ack names the step it came before. A setting is applied:
    its ack names the step and what was applied, or the future gets the reason it was refused. Kinds
    in ``skip`` are passed over."""
    for kind, data, fut in commands:
        if kind in CONTROL_FLAGS:
            if fut is not None:
                fut.set_result(ack(kind, step()))
            continue
        if kind in skip:
            continue
        try:
            applied = apply(kind, data)
        except LrvizError as exc:  # e.g. a plateau schedule without validation data
            on_reject(kind, exc)
            if fut is not None:
                fut.set_exception(exc)
            continue
        if fut is not None:
            fut.set_result(ack(kind, step(), applied))


class RunControl:
    """Flags and a command queue between any thread and one training loop."""

    def __init__(self, *, start_paused: bool = False, pace: float | None = None):
        self._cond = threading.Condition()
        self._commands: deque[tuple[str, dict[str, Any], Future | None]] = deque()
        #: The one flag the loop reads every step: something is queued, or a control was raised.
        self.attention = start_paused
        self.pause_requested = start_paused
        self.stop_requested = False
        self.step_budget: int | None = None
        self.pace: float | None = pace
        self.closed = False
        self._paced_at: float | None = None

    # ---- any thread -----------------------------------------------------------------------------------
    def signal(self, **flags: Any) -> None:
        """Set flags and wake the loop (a pause, a resume...)."""
        with self._cond:
            for name, value in flags.items():
                setattr(self, name, value)
            self.attention = True
            self._cond.notify_all()

    def pause(self) -> None:
        self.signal(**CONTROL_FLAGS[Command.PAUSE])

    def resume(self) -> None:
        self.signal(**CONTROL_FLAGS[Command.RESUME])

    def step_once(self) -> None:
        self.signal(**CONTROL_FLAGS[Command.STEP_ONCE])

    def stop(self) -> None:
        self.signal(**CONTROL_FLAGS[Command.STOP])

    def set_pace(self, steps_per_second: float | None) -> float | None:
        """Slow motion: at most this many steps a second (None or 0: full speed). Takes effect at once."""
        pace = float(steps_per_second) if steps_per_second else None
        if pace is not None and not (math.isfinite(pace) and pace > 0):
            raise ConfigError(f"pace must be a number of steps per second > 0, not {steps_per_second!r}")
        self.signal(pace=pace)
        return pace

    def enqueue(self, kind: str, data: dict[str, Any], future: Future | None = None,
                state: Callable[[], str] = lambda: "over") -> Future | None:
        """Queue a command (already checked) for the next step boundary; a control also acts now.

        When the loop has ended, the future gets the refusal at once.
        """
        with self._cond:
            if self.closed:
                if future is not None:
                    future.set_exception(ConfigError(f"the run has ended ({state()})"))
                return future
            for name, value in CONTROL_FLAGS.get(kind, {}).items():
                setattr(self, name, value)
            self._commands.append((str(kind), data, future))
            self.attention = True
            self._cond.notify_all()
        return future

    # ---- the loop ------------------------------------------------------------------------------------
    def attend(self, apply: Callable[[str, dict[str, Any]], dict[str, Any] | None], step: Callable[[], int], *,
               on_pause: Callable[[], None], on_resume: Callable[[], None],
               on_reject: Callable[[str, LrvizError], None]) -> None:
        """Between two steps: apply queued commands, wait while paused; raise Stopped on stop.

        Commands run outside the lock (a checkpoint or a range test may take a while), so other
        threads never block on the loop.
        """
        paused = False
        while True:
            apply_commands(self.take(), apply, step, on_reject)
            with self._cond:
                stop = self.stop_requested
                resumed = paused and not self.pause_requested
                if not stop:
                    if not self.pause_requested:
                        break
                    if paused and not self._commands:
                        self._cond.wait()
                        continue
            if stop:
                if resumed:  # it resumed (and said so in its ack) before the stop came
                    on_resume()
                raise Stopped
            if not paused:
                paused = True
                on_pause()
        if paused:
            on_resume()

    def apply_settings(self, apply: Callable[[str, dict[str, Any]], dict[str, Any] | None], step: int,
                       on_reject: Callable[[str, LrvizError], None]) -> None:
        """Apply the queued commands that change settings now, leaving pause/stop for :meth:`attend`.

        For a loop that can take a new rate in one place (just before the optimizer steps) but can
        only block or end in another (``lrviz.track``: inside ``run.step``).
        """
        with self._cond:
            settings = [c for c in self._commands if c[0] not in CONTROL_FLAGS]
            if not settings:
                return
            self._commands = deque(c for c in self._commands if c[0] in CONTROL_FLAGS)
        apply_commands(settings, apply, lambda: step, on_reject)

    def take(self) -> list[tuple[str, dict[str, Any], Future | None]]:
        """Every queued command, taken off the queue, and the attention flag lowered: for a loop that
        applies them elsewhere (rank 0 of a distributed run sends them to every rank)."""
        with self._cond:
            self.attention = False
            out = list(self._commands)
            self._commands.clear()
        return out

    def wait_while_paused(self, timeout: float) -> None:
        """Block while a pause is asked and nothing is queued, at most ``timeout`` seconds."""
        with self._cond:
            if self.pause_requested and not self.stop_requested and not self._commands:
                self._cond.wait(timeout)

    def count_step(self) -> None:
        """One step done: a step-once budget that runs out pauses the loop before the next."""
        with self._cond:
            if self.step_budget is not None:
                self.step_budget -= 1
                if self.step_budget <= 0:
                    self.step_budget = None
                    self.pause_requested = True
                    self.attention = True

    def wait_for_pace(self, now: float) -> None:
        """Sleep until the next step is due (woken early by any command, so pause and stop stay prompt)."""
        pace = self.pace
        if pace is None:
            return
        last = self._paced_at
        due = now if last is None else last + 1.0 / pace
        delay = due - now
        if delay > 0:
            with self._cond:
                if not self.attention:
                    self._cond.wait(delay)
        self._paced_at = max(due, now) if delay > -0.1 else now

    def close(self, state: str, step: int) -> None:
        """The loop has ended: answer what is left (a stop is then done; the rest are refused)."""
        with self._cond:
            self.closed = True
            left = list(self._commands)
            self._commands.clear()
        for kind, data, fut in left:
            own = data.get("future")  # a command that answers through its own Future (a range test)
            for f in (fut, own if isinstance(own, Future) else None):
                if f is None or f.done():
                    continue
                if kind == Command.STOP:
                    f.set_result(ack(kind, step))
                else:
                    f.set_exception(ConfigError(f"the run ended ({state}) before {kind} took effect"))


class Steering:
    """The commands of a run as methods, each a Future of its ack: for anything with ``command(kind, **data)``
    (a watched :class:`lrviz.live.run.Run`, a :class:`lrviz.tracking.TrackedRun`)."""

    def command(self, kind: str, **data: Any) -> Future:
        raise NotImplementedError

    def pause(self) -> Future:
        return self.command(Command.PAUSE)

    def resume(self) -> Future:
        return self.command(Command.RESUME)

    def step_once(self) -> Future:
        return self.command(Command.STEP_ONCE)

    def stop(self) -> Future:
        return self.command(Command.STOP)

    def set_lr(self, lr: float) -> Future:
        return self.command(Command.SET_LR, lr=lr)

    def set_schedule(self, spec: str | None) -> Future:
        return self.command(Command.SET_SCHEDULE, spec=spec)

    def set_hyperparams(self, momentum: float | None = None, weight_decay: float | None = None) -> Future:
        return self.command(Command.SET_HYPERPARAMS, momentum=momentum, weight_decay=weight_decay)

    def set_clip(self, clip_grad_norm: float | None) -> Future:
        """Clip the gradient norm to ``clip_grad_norm`` (None: stop clipping); lrviz's own runner only."""
        return self.command(Command.SET_CLIP, clip_grad_norm=clip_grad_norm)

    def rollback(self, lr_factor: float = 0.1) -> Future:
        return self.command(Command.ROLLBACK, lr_factor=lr_factor)

    def checkpoint(self) -> Future:
        return self.command(Command.CHECKPOINT)

    def range_test(self, **kwargs: Any) -> Future:
        return self.command(Command.RANGE_TEST, **kwargs)

    def confirm_lr(self, rates: list[tuple[float, str]] | list[float], **kwargs: Any) -> Future:
        """Train each of ``rates`` a short while from the run's current weights (``steps``,
        ``stop_factor``) and restore them; the ack's ``data["confirmation"]`` names the winner."""
        return self.command(Command.CONFIRM_LR, rates=[list(r) if isinstance(r, tuple) else r for r in rates],
                            **kwargs)

    def cancel_range_test(self) -> Future:
        """Stop a range test or a confirmation early."""
        return self.command(Command.CANCEL_RANGE_TEST)

    def set_pace(self, steps_per_second: float | None) -> Future:
        return self.command(Command.SET_PACE, steps_per_second=steps_per_second)
