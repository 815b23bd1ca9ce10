"""Record and steer a Hugging Face ``Trainer`` with lrviz: ``Trainer(..., callbacks=[LrvizCallback()])``.

::

    from lrviz.integrations.transformers import LrvizCallback
    args = TrainingArguments(output_dir="out", logging_steps=1, ...)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[LrvizCallback(name="gpt2")])
    trainer.train()                                    # live: lrviz steer RUN --lr 1e-4

A thin layer over :func:`lrviz.track` on the trainer's optimizer: one stored run per ``train()``,
live while it trains. Step ``s`` is the trainer's global step ``s + 1`` (an optimizer update),
recorded with the rate each param group used. Its loss is the one the trainer logs at that step
(``logging_steps``; with ``logging_steps=1`` every step has one, otherwise the steps between logs
are recorded as not measured); ``eval_loss`` (and ``eval_accuracy``) become validation points,
every other number logged an extra scalar series. Steering lands on the optimizer before the next
update (from then on lrviz's rate holds against the trainer's scheduler); pause blocks the loop;
stop sets ``control.should_training_stop``. Under several processes the main process records and
the run is watch-only.
"""

from __future__ import annotations

import atexit
import math
from typing import Any

from lrviz.states import RunState, is_terminal
from lrviz.tracking import _DEFAULT, TrackedRun

from ._common import MULTI_PROCESS, TrackOptions, need, plain, start_run

transformers = need("transformers", "transformers", "Hugging Face transformers (and accelerate)")

__all__ = ["LrvizCallback"]

#: Logged names that are not extra series: the loss and rate lrviz records itself, the trainer's clock.
_OWN = frozenset({"loss", "learning_rate", "epoch", "eval_loss", "step"})
_TRAINING_ARGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
                  "gradient_accumulation_steps", "per_device_train_batch_size", "num_train_epochs", "max_steps",
                  "logging_steps", "optim", "seed", "bf16", "fp16")


class LrvizCallback(TrackOptions, transformers.TrainerCallback):
    """Record (and serve, to steer live) each ``train()`` of the trainer it is given to.

    ``name``: the run's name (default: the model's class name). ``store``, ``listen``, ``config``,
    ``grad_norm``, ``quiet``: as :func:`lrviz.track` takes them. ``run`` is the current (or last)
    :class:`TrackedRun`.
    """

    def __init__(self, name: str | None = None, *, store: Any = _DEFAULT, listen: str | None | bool = _DEFAULT,
                 config: dict[str, Any] | None = None, grad_norm: bool = False, quiet: bool = False):
        self._keep_track_options(name, store, listen, config, grad_norm, quiet)
        self.run: TrackedRun | None = None
        self._pending = False  # the last update's row waits for the loss the trainer is about to log
        self._exit_hook = False

    # ---- train -----------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._end()
        if optimizer is None:
            return
        world = args.world_size
        self.run = start_run(
            [_unwrapped(optimizer)], model=model, name=self.name or type(model).__name__, store=self.store,
            listen=self.listen, config={**self._settings(args, model), **self.config},
            steps=state.max_steps or None, grad_norm=self.grad_norm, quiet=self.quiet,
            first_step=state.global_step, read_only=MULTI_PROCESS.format(n=world) if world > 1 else None)
        self._pending = False
        if self.run is not None and not self._exit_hook:
            atexit.register(self._at_exit)  # Trainer has no hook for an exception: end the run with the process
            self._exit_hook = True

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.set_epoch(math.floor((state.epoch or 0) + 1e-9))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._commit(None, control)  # an update whose log never came

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        self._commit(None, control)
        if control.should_log:  # decided by DefaultFlowCallback, which runs first: on_log follows
            self._pending = True
        else:
            self._record(None, control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        run = self.run
        if run is None or not logs:
            return
        values = {k: float(v) for k, v in logs.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "loss" in values and self._pending:
            self._commit(values.pop("loss"), control)
        at = max(state.global_step - 1, run.first_step)
        extra = {k: v for k, v in values.items() if k not in _OWN}
        if "eval_loss" in values:
            extra["val_loss"] = values["eval_loss"]
            if "eval_accuracy" in extra:
                extra["val_accuracy"] = extra.pop("eval_accuracy")
        if "loss" in values:  # a loss logged for steps already recorded (logging_strategy="epoch")
            extra["train_loss_logged"] = values["loss"]
        if extra:
            run.log(step=at, **extra)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pass  # a pending row waits: the epoch's last log comes after this hook

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._commit(None, control)
        self._end()

    # ---- internals -------------------------------------------------------------------------------------
    def _commit(self, loss: float | None, control: Any) -> None:
        if self._pending:
            self._pending = False
            self._record(loss, control)

    def _record(self, loss: float | None, control: Any) -> None:
        run = self.run
        run.step(loss)
        run.hold_rates()  # the trainer's scheduler stepped after the update
        if run.should_stop:
            control.should_training_stop = True

    def _end(self) -> None:
        if self.run is not None:
            self.run.finish()  # once: a finished run ignores it

    def _at_exit(self) -> None:
        run = self.run
        if run is not None and not is_terminal(run.state):
            run.error = "the process ended inside Trainer.train (an exception, or the process was stopped)"
            run.finish(RunState.FAILED)

    @staticmethod
    def _settings(args: Any, model: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"trainer": "transformers", "model": type(model).__name__}
        for key in _TRAINING_ARGS:
            value = getattr(args, key, None)
            out[key] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
        return plain(out)


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper (its step hooks are the ones that run)."""
    import torch

    while not type(optimizer).__module__.startswith("torch.") and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
