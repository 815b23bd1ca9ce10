"""The learning rate of a run: the rate of every param group, the schedule in force, and how a
change by hand or a new schedule takes over. Shared by the built-in engine and ``lrviz.track``.

Semantics (the README's "Steps, rates and interventions"): a schedule applied at step k starts from
the current rate and counts from k; setting the rate by hand while a schedule runs rescales the rest
of the schedule so its next value is the rate asked for (or drops a schedule that cannot be
rescaled). The optimizer's ``param_groups`` always hold what the next step will use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import ConfigError


class RateControl:
    """The rates of ``optimizer``'s param groups and the schedule driving them."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.lrs: list[float] = [float(g["lr"]) for g in optimizer.param_groups]
        self.schedule: Any = None
        self.schedule_start = 0

    @property
    def groups(self) -> int:
        return len(self.lrs)

    def at_step(self, step: int) -> list[float]:
        """The rates of step ``step``, written into the param groups when a schedule runs."""
        sched = self.schedule
        if sched is not None:
            lrs = sched.lrs(step - self.schedule_start)
            for g, lr in zip(self.optimizer.param_groups, lrs):
                g["lr"] = lr
            self.lrs = lrs
        return self.lrs

    def set_lr(self, lr: float, step: int) -> None:
        """Use ``lr`` from ``step`` on (groups keep their ratios); a schedule is rescaled to continue from it."""
        sched = self.schedule
        if sched is not None and not sched.rescale(step - self.schedule_start, lr):
            self.schedule = sched = None
        if sched is not None:
            self.lrs = [float(x) for x in sched.lrs(step - self.schedule_start)]
        else:
            base = self.lrs[0]
            self.lrs = [lr * (x / base) if base > 0 else lr for x in self.lrs]
        self.write(self.lrs)

    def set_schedule(self, spec: str | None, step: int, *, has_validation: bool = True) -> None:
        """Start schedule ``spec`` at ``step`` from the current rates (None: hold the current rate)."""
        if spec is None:
            self.schedule = None
            return
        from .schedules import parse_schedule

        parsed = parse_schedule(spec)
        if parsed.stateful and not has_validation:
            raise ConfigError(f"{parsed.name} steps on validation loss, and this run has no validation data; "
                              "return (train, val) from build_data() to use it")
        self.schedule = parsed.bind(self.lrs)
        self.schedule_start = step
        self.lrs = [float(x) for x in self.schedule.lrs(0)]
        self.write(self.lrs)

    def observe_validation(self, val_loss: float, step: int) -> bool:
        """Tell a validation-driven schedule (ReduceLROnPlateau) the loss; True when it lowered the rate."""
        sched = self.schedule
        if sched is None or not getattr(sched, "stateful", False):
            return False
        if not sched.observe_validation(val_loss):
            return False
        self.lrs = [float(x) for x in sched.lrs(step - self.schedule_start)]
        self.write(self.lrs)
        return True

    def write(self, lrs: Sequence[float]) -> None:
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sched = self.schedule
        return {"lrs": list(self.lrs),
                "schedule": None if sched is None else {"start": self.schedule_start, "state": sched.state_dict()}}

    def load_state_dict(self, lrs: Sequence[float], schedule: dict[str, Any] | None) -> None:
        from .schedules import Schedule

        self.lrs = [float(x) for x in lrs]
        self.write(self.lrs)
        if schedule is None:
            self.schedule = None
        else:
            self.schedule = Schedule.from_state_dict(schedule["state"])
            self.schedule_start = int(schedule["start"])
