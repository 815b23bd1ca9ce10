"""Record and steer a Lightning 2.x ``Trainer.fit`` with lrviz: ``Trainer(callbacks=[LrvizCallback()])``.

::

    from lrviz.integrations.lightning import LrvizCallback
    trainer = L.Trainer(max_epochs=10, callbacks=[LrvizCallback(name="resnet")])
    trainer.fit(model, train_loader, val_loader)      # live: lrviz steer RUN --lr 0.01

A thin layer over :func:`lrviz.track` on the trainer's optimizer(s): one stored run per ``fit``, live
while it trains. Step ``s`` is the trainer's global step (an optimizer update); its loss is what
``training_step`` returned (with ``accumulate_grad_batches``, the mean of the update's micro-batches),
and its rates the ones each param group used. Validation loss (and accuracy) come from
``trainer.callback_metrics`` at validation end, and every other value the module logs is kept as an
extra scalar series. Steering lands on the trainer's optimizer before the next update (from then on
lrviz's rate holds against the module's own LR scheduler); pause blocks the loop; stop sets
``trainer.should_stop``. Under several processes rank 0 records and the run is watch-only.
"""

from __future__ import annotations

import math
from typing import Any

from lrviz.states import RunState, is_terminal
from lrviz.tracking import _DEFAULT, TrackedRun

from ._common import MULTI_PROCESS, TrackOptions, need, plain, scalar, start_run

L = need("lightning.pytorch", "lightning", "Lightning 2.x (the `lightning` package)")

__all__ = ["LrvizCallback"]

#: Names a module commonly logs its validation loss and accuracy under (first found wins).
VAL_LOSS_KEYS = ("val_loss", "val/loss", "valid_loss", "validation_loss", "val_loss_epoch", "val/loss_epoch")
VAL_ACCURACY_KEYS = ("val_acc", "val_accuracy", "val/acc", "val/accuracy", "valid_acc", "val_acc_epoch",
                     "val_accuracy_epoch")


class LrvizCallback(TrackOptions, L.Callback):
    """Record (and serve, to steer live) each ``fit`` of the trainer it is given to.

    ``name``: the run's name (default: the module's class name). ``store``, ``listen``, ``config``,
    ``grad_norm``, ``quiet``: as :func:`lrviz.track` takes them. ``val_loss`` / ``val_accuracy``: the
    logged names of the validation loss and accuracy (default: the first of :data:`VAL_LOSS_KEYS` /
    :data:`VAL_ACCURACY_KEYS` the module logs). ``run`` is the current (or last) :class:`TrackedRun`.
    """

    def __init__(self, name: str | None = None, *, store: Any = _DEFAULT, listen: str | None | bool = _DEFAULT,
                 config: dict[str, Any] | None = None, val_loss: str | None = None, val_accuracy: str | None = None,
                 grad_norm: bool = False, quiet: bool = False):
        self._keep_track_options(name, store, listen, config, grad_norm, quiet)
        self.val_loss = val_loss
        self.val_accuracy = val_accuracy
        self.run: TrackedRun | None = None
        self._last_global = 0
        self._loss_sum: Any = None
        self._micro = 0
        self._last: dict[str, tuple[int, float]] = {}  # each logged name's last (step, value) taken

    # ---- fit -------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # LearningRateMonitor starts here too: the optimizers and data are set up, the sanity check is over
        if trainer.global_rank != 0:
            return
        self._end()
        optimizers = list(trainer.optimizers)
        if not optimizers:
            return
        steps = trainer.estimated_stepping_batches
        world = trainer.world_size
        self.run = start_run(
            optimizers, model=pl_module, name=self.name or type(pl_module).__name__, store=self.store,
            listen=self.listen, config={**self._settings(trainer, pl_module), **self.config},
            steps=int(steps) if isinstance(steps, (int, float)) and math.isfinite(steps) else None,
            grad_norm=self.grad_norm, quiet=self.quiet, first_step=trainer.global_step,
            read_only=MULTI_PROCESS.format(n=world) if world > 1 else None)
        self._last_global = trainer.global_step
        self._loss_sum, self._micro = None, 0
        self._last = {}
        self._fresh(trainer.callback_metrics)  # what was logged before this fit is not news

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None:
            self.run.set_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        run = self.run
        if run is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if hasattr(loss, "detach"):
            n = trainer.accumulate_grad_batches
            if n > 1 and pl_module.automatic_optimization:
                loss = loss * n  # Lightning hands back the loss divided by n (what it back-propagates)
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._micro += 1
        if trainer.global_step == self._last_global:
            return  # accumulating: the update comes with a later micro-batch
        self._last_global = trainer.global_step
        total, micro = self._loss_sum, self._micro
        self._loss_sum, self._micro = None, 0
        run.step(None if total is None else total / micro if micro > 1 else total)
        run.hold_rates()  # the module's scheduler stepped after the update
        if trainer.log_every_n_steps and (run.steps_done % trainer.log_every_n_steps == 0 or trainer.should_stop):
            self._log_scalars(trainer)
        if run.should_stop:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None:
            self._log_scalars(trainer)  # the epoch-level aggregates (``on_epoch=True``)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is None or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        loss_key = self.val_loss or next((k for k in VAL_LOSS_KEYS if k in metrics), None)
        acc_key = self.val_accuracy or next((k for k in VAL_ACCURACY_KEYS if k in metrics), None)
        values = self._fresh(metrics)
        loss = scalar(metrics[loss_key]) if loss_key in metrics else None
        for key in (loss_key, acc_key, "val_loss", "val_accuracy"):  # val_*: names lrviz keeps for validation
            values.pop(key, None)
        if loss is not None:
            values["val_loss"] = loss
            if acc_key in metrics and scalar(metrics[acc_key]) is not None:
                values["val_accuracy"] = scalar(metrics[acc_key])
        if values:
            self.run.log(step=self._step(), **values)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        run = self.run
        if run is not None and not is_terminal(run.state):
            if isinstance(exception, KeyboardInterrupt):
                run.finish(RunState.STOPPED)
            else:
                run.__exit__(type(exception), exception, exception.__traceback__)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._end()

    # ---- internals -------------------------------------------------------------------------------------
    def _end(self) -> None:
        if self.run is not None:
            self.run.finish()  # once: a finished run ignores it

    def _step(self) -> int:
        return max(self.run.steps_done - 1, self.run.first_step)

    def _fresh(self, metrics: dict[str, Any]) -> dict[str, float]:
        """The logged values that are news: changed since the last look, not yet taken at this step.

        Lightning hands back a value it logged steps ago as a new object (an epoch's end shows the
        last step's value again), so news is a change of value, one point a step, one name per value.
        """
        step = self._step()
        fresh: dict[str, float] = {}
        taken: set[int] = set()
        last = self._last
        for key, value in metrics.items():
            if id(value) in taken:  # ``x`` and ``x_step`` are one value
                continue
            taken.add(id(value))
            v = scalar(value)
            if v is None:
                continue
            before = last.get(key)
            if before is not None and (before[0] == step or before[1] == v):
                continue
            last[key] = (step, v)
            fresh[key] = v
        return fresh

    def _log_scalars(self, trainer: Any) -> None:
        values = self._fresh(trainer.callback_metrics)
        values.pop("val_loss", None)
        values.pop("val_accuracy", None)
        if values:
            self.run.log(step=self._step(), **values)

    @staticmethod
    def _settings(trainer: Any, pl_module: Any) -> dict[str, Any]:
        out = {"trainer": "lightning", "module": type(pl_module).__name__,
               "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
               "accumulate_grad_batches": trainer.accumulate_grad_batches, "precision": str(trainer.precision)}
        hparams = plain(dict(getattr(pl_module, "hparams", {}) or {}))
        if hparams:
            out["hparams"] = hparams
        return plain(out)
