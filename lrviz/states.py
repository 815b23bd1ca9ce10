"""The names every layer shares: run states, event kinds and live commands, defined once.

They are ``str`` enums, so a member equals its text (``RunState.RUNNING == "running"``), is
stored and sent as that text, and formats as it; code that compares with plain strings keeps working.
"""

from __future__ import annotations

from enum import Enum

from .errors import ConfigError


class _Name(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class RunState(_Name):
    """Where a run is. ``INTERRUPTED`` is only ever set by the store (its process died)."""

    IDLE = "idle"
    PREPARING = "preparing"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"
    DIVERGED = "diverged"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CREATED = "created"


#: States after which a run does not continue.
TERMINAL_STATES = frozenset({RunState.FINISHED, RunState.STOPPED, RunState.DIVERGED, RunState.FAILED,
                             RunState.INTERRUPTED})
#: States of a run whose training process is (as far as we know) alive.
LIVE_STATES = frozenset({RunState.PREPARING, RunState.RUNNING, RunState.PAUSED})


def is_terminal(state: str | None) -> bool:
    """Whether ``state`` (an enum member or its text) is one a run does not leave."""
    return state in TERMINAL_STATES


class EventKind(_Name):
    """What an event records. Interventions first (they can be replayed), then everything else."""

    SET_LR = "set_lr"
    SET_SCHEDULE = "set_schedule"
    SET_HYPERPARAMS = "set_hyperparams"
    SET_CLIP = "set_clip"
    ROLLBACK = "rollback"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    ERROR = "error"
    DIVERGED = "diverged"
    WARNING = "warning"
    LR_REDUCED = "lr_reduced"
    EARLY_STOP = "early_stop"
    REJECTED = "rejected"
    CHECKPOINT = "checkpoint"
    RANGE_TEST = "range_test"
    #: Gradient clipping became active (``{"active": true, ...}``) or has not clipped for a while (``false``).
    CLIPPING = "clipping"
    #: fp16: the gradient scaler began skipping updates (inf/NaN gradients); one event per episode.
    SKIPPED_STEPS = "skipped_steps"


#: Event kinds that change the run's settings (replayed by ``lrviz replay``; marked on the plots).
INTERVENTION_KINDS = (EventKind.SET_LR, EventKind.SET_SCHEDULE, EventKind.SET_HYPERPARAMS, EventKind.SET_CLIP,
                      EventKind.ROLLBACK)


class Command(_Name):
    """What a client may ask of a live run; each is answered with the step it takes effect at, or a reason."""

    SET_LR = "set_lr"
    SET_SCHEDULE = "set_schedule"
    SET_HYPERPARAMS = "set_hyperparams"
    SET_CLIP = "set_clip"
    ROLLBACK = "rollback"
    PAUSE = "pause"
    RESUME = "resume"
    STEP_ONCE = "step_once"
    STOP = "stop"
    CHECKPOINT = "checkpoint"
    RANGE_TEST = "range_test"
    #: Train a few candidate rates from the current weights for a short while; the ack names the winner.
    CONFIRM_LR = "confirm_lr"
    CANCEL_RANGE_TEST = "cancel_range_test"
    SET_PACE = "set_pace"


def parse_command(kind: str) -> Command:
    """The :class:`Command` named ``kind``, or a ConfigError that lists the known ones."""
    try:
        return Command(kind)
    except ValueError:
        raise ConfigError(f"unknown command {kind!r}; known: {', '.join(c.value for c in Command)}") from None


#: Commands that change training and are applied between two steps (the rest act on the loop itself).
SETTING_COMMANDS = frozenset({Command.SET_LR, Command.SET_SCHEDULE, Command.SET_HYPERPARAMS, Command.SET_CLIP,
                              Command.ROLLBACK})
