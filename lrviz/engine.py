"""The training engine: trains an experiment step by step, steerable from any thread.

The loop lives here; the commands it obeys (asked from any thread, applied between steps) are its
base class :class:`~lrviz.engine_commands.EngineCommands`. It calls separate units for everything else:
:class:`~lrviz.control.RunControl` (the command queue, pause, stop), :class:`~lrviz.rates.RateControl` (the rate and the
schedule), :class:`~lrviz.staging.Staging` and :class:`~lrviz.staging.GradNorm` (recording a step
without a host sync), :func:`~lrviz.validation.validate`, :class:`~lrviz.checkpoint.Checkpoints`
(saving, pruning, choosing a roll-back target), :mod:`lrviz.continuation` (forks and resumes), a
:class:`~lrviz.recorder.RunRecorder` (the records and the store row) and, for a run with mixed
precision, gradient accumulation or clipping, an :class:`~lrviz.update.UpdateStep` (a plain run never
touches it: its step is forward, backward, step).

Data flows one way: the engine appends to its recorder; readers (the app's timer, the live
endpoint, the store writer) read it. Nothing in the engine waits on a reader.

Why ~900 lines in one module: what is left is the run's life (prepare, open, train, finish) and the
loop's two step paths (a plain step inlined for speed, and the general one through UpdateStep), with
the checkpoint, roll-back, guard and range-test hooks that need the loop's own state between steps;
splitting these further would pass that state around instead of reading it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import failure
from . import interventions as iv
from .checkpoint import (
    CheckpointInfo,
    Checkpoints,
    capture_generators,
    capture_rng,
    data_generators,
    restore_generators,
)
from .config import RunConfig
from .continuation import Origin, parent_interventions, rebuild_position, take_over_stored_run
from .control import RunControl, Stopped
from .devices import resolve_device, to_device
from .engine_commands import EngineCommands
from .errors import ConfigError, DivergedError, LrvizError, ScriptError
from .experiment import Experiment, error_from_exception
from .optim import build_optimizer
from .rates import RateControl
from .recorder import Recorded, RunRecorder, recorded
from .records import Event, StepBuffer, ValPoint
from .staging import GradNorm, Staging
from .states import TERMINAL_STATES
from .update import ScalerAwareGuard, StepWatch, UpdateStep, check_amp
from .validation import validate

__all__ = ["TERMINAL_STATES", "Origin", "TrainingEngine", "seed_everything"]

log = logging.getLogger(__name__)

#: Micro-batch losses in these dtypes are summed in float32 (the mean of an accumulated update).
_HALF = (torch.float16, torch.bfloat16)


class _EarlyStop(Exception):
    """Raised when early stopping ends the run (it then counts as finished)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class TrainingEngine(EngineCommands, Recorded):
    """Trains ``experiment`` with ``config``; records every step; obeys commands from any thread.

    Use ``start()`` for a background thread or ``run()`` to train in the calling thread. ``state``
    is one of idle, preparing, running, paused, finished, stopped, diverged, failed (a
    :class:`lrviz.states.RunState`). ``error`` holds the :class:`LrvizError` of a failed run,
    ``error_detail`` its traceback.
    """

    on_open = recorded("on_open")

    def __init__(
        self,
        experiment: Experiment,
        config: RunConfig,
        store: Any = None,
        *,
        interventions: Iterable[iv.Intervention] = (),
        name: str | None = None,
        start_paused: bool = False,
        stop_on_divergence: bool = True,
        stage_on_device: bool | None = None,
        origin: Origin | None = None,
        checkpoint_dir: str | Path | None = None,
        keep_checkpoints: int = 5,
        layer_stats_every: int | None = None,
        distributed: Any = None,
    ):
        self.experiment = experiment
        self.config = config.validated()
        self.store = store
        self.name = name
        self.stop_on_divergence = stop_on_divergence
        #: Keep losses on the device and copy them per flush (default: on any accelerator).
        self.stage_on_device = stage_on_device
        self.rec = RunRecorder(store)
        self.control = RunControl(start_paused=start_paused, pace=self.config.pace)
        self.rates: RateControl | None = None
        self.error: LrvizError | None = None
        self.error_detail = ""
        self.device: torch.device | None = None
        self.step = 0  # the index of the next step
        self.epoch = 0
        self.total_steps: int | None = config.steps
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.done = threading.Event()
        self.origin = origin
        self.checkpoint_every = self.config.checkpoint_every
        self.guard: Any = None
        self.detection: Any = None  # the guard's last Detection, until a roll-back or resume
        self.layer_stats_every = layer_stats_every
        self.layer_probe: Any = None
        #: This rank's place in a torchrun job (a :class:`lrviz.distributed.Distributed`), or None.
        self.dist = distributed
        #: At the end of a distributed run: whether every rank's parameters are identical.
        self.ranks_in_sync: bool | None = None
        self._train_model: torch.nn.Module | None = None  # the model in DistributedDataParallel
        self._pending = sorted(interventions)
        self._thread: threading.Thread | None = None
        self._train_data: Any = None
        self._val_data: Any = None
        self._loss_of: Any = None
        self._staging: Staging | None = None
        self._ckpts = Checkpoints(Path(checkpoint_dir) if checkpoint_dir else None, keep_checkpoints)
        self._batch_in_epoch = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._data_gens: dict[str, torch.Generator] = {}  # the training data's own generators
        self._epoch_data_rng: dict[str, torch.Tensor] | None = None
        self._resume_iter: tuple[Any, int] | None = None  # (iterator, batches taken) of a continued epoch
        self._start_step = 0  # the step this engine started at (a fork's or resume's checkpoint step)
        self._time_offset = 0.0
        self._auto_rollbacks = 0
        self._early: Any = None
        self._probe: Any = None
        self._range_cancel = False
        #: How each update is made when the run asks for more than a plain step (None: a plain step).
        self._updater: UpdateStep | None = None
        self._clip: float | None = self.config.clip_grad_norm  # the threshold in force (steerable)
        self._watch: StepWatch | None = None
        self._guard_feed: Any = None  # the guard as the loop feeds it (fp16: blind to skipped steps)
        self._gnorm: GradNorm | None = None
        self._bind_grads = True  # False: continuing a run whose gradients were never bound (GradNorm)

    # ---- what watchers read ---------------------------------------------------------------------------
    @property
    def lrs(self) -> list[float]:
        """The current rate of every param group (empty before the run is prepared)."""
        return self.rates.lrs if self.rates is not None else []

    @property
    def schedule(self) -> Any:
        return self.rates.schedule if self.rates is not None else None

    @property
    def clip_grad_norm(self) -> float | None:
        """The gradient-clipping threshold in force (None: no clipping)."""
        return self._clip

    @property
    def steps_done(self) -> int:
        """The number of steps done (the index of the next step), as every live source says it."""
        return self.step

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """The checkpoints kept, oldest first."""
        return self._ckpts.items

    @property
    def _pause_requested(self) -> bool:
        return self.control.pause_requested

    @property
    def _pace(self) -> float | None:
        return self.control.pace

    # ---- the run --------------------------------------------------------------------------------------
    def run(self) -> str:
        """Prepare and train in the calling thread; return the final state.

        The run always ends in a true state: a KeyboardInterrupt ends it as stopped, an ``exit()`` in
        the script as failed (both re-raised afterwards when run() trains in the main thread).
        """
        self.rec.t0 = time.perf_counter()
        # OpenMP's thread count is per thread: a new thread would use every core for each small
        # matmul and spin-wait on the others, whatever torch.set_num_threads() said in the main thread
        torch.set_num_threads(torch.get_num_threads())
        control: BaseException | None = None
        try:
            self.state = "preparing"
            self._prepare()
            self._open_run()
            # the time column counts from the start of training (continuing a checkpoint's time)
            self.rec.t0 = time.perf_counter() - self._time_offset
            if self.control.stop_requested and self.dist is None:  # across ranks: at the first agreed step
                raise Stopped
            self._train()
            self.state = "finished"
        except Stopped:
            self.state = "stopped"
            self._event("stop", {})
        except _EarlyStop:
            self.state = "finished"
        except DivergedError as exc:
            self.state = "diverged"
            self.error = exc
            self._publish()
            misread = failure.not_the_rate(self)  # e.g. an empty batch: no advice to lower the rate
            if misread is not None:
                self._fail(misread)
        except LrvizError as exc:
            self._publish()
            overflow = failure.rate_out_of_range(self)  # --lr 1e300: the update itself overflows
            if overflow is not None:
                self.state = "diverged"
                self.error = overflow
                self._event("diverged", {"message": str(overflow)})
            else:
                self._fail(exc)
        except Exception as exc:  # a bug in the user's code we could not place, or ours
            err = error_from_exception(exc, self.experiment.path, "training")
            if err.line is None:
                err = LrvizError(f"internal error in lrviz: {type(exc).__name__}: {exc} "
                                 "(please report it; --debug shows the traceback)")
                err.__cause__ = exc
            self._fail(err, exc)
        except KeyboardInterrupt as exc:  # Ctrl+C while run() trains in the main thread, or the script
            self.state = "stopped"
            self._event("stop", failure.interrupt_data(exc, self))
            control = exc
        except BaseException as exc:  # exit() in the script
            self._fail(failure.exit_error(exc, self), exc)
            control = exc
        finally:
            self._finish()
        if control is not None and threading.current_thread() is threading.main_thread():
            raise control
        return self.state

    def _fail(self, err: LrvizError, exc: BaseException | None = None) -> None:
        if self.dist is not None:  # another rank's message when it caused this; else ours, told to the others
            err = self.dist.failed(err)
        self.state = "failed"
        self.error = err
        cause = exc or err.__cause__ or err
        self.error_detail = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
        self._event("error", {"message": str(err)})
        log.debug("run failed: %s", self.error_detail)

    def _prepare(self) -> None:
        cfg = self.config
        exp = self.experiment
        dist = self.dist
        if dist is not None:
            dist.begin(self)
        self.device = resolve_device(cfg.device) if dist is None else dist.device
        check_amp(cfg.amp, self.device)
        seed_everything(cfg.seed)
        model = exp.make_model(cfg.params).to(self.device)
        if dist is None:
            train, val = exp.make_data(cfg.batch_size, cfg.params)
        else:
            train, val = dist.make_data(exp, cfg.batch_size, cfg.params, seed=cfg.seed, epoch=lambda: self.epoch)
        self._train_data, self._val_data = train, val
        self._data_gens = data_generators(train)
        opt = exp.make_optimizer(model, cfg.lr)
        if opt is None:
            opt = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                                  cfg.weight_decay, cfg.nesterov)
        self.model, self.optimizer = model, opt
        self._make_updater()
        self.rates = RateControl(opt)
        self.buffer = StepBuffer(groups=self.rates.groups, capacity=max(4096, min(cfg.steps or 0, 1 << 20)))
        self._loss_of = exp.loss_function()
        if cfg.steps is None:
            try:  # an update takes `accumulate` batches; an epoch's last one may take fewer
                self.total_steps = -(-len(train) // cfg.accumulate) * (cfg.epochs or 1)  # type: ignore[arg-type]
            except TypeError:
                self.total_steps = None
        if cfg.schedule:
            if val is None:
                self._check_schedule_usable(cfg.schedule, "schedule ")
            self.rates.set_schedule(cfg.schedule, 0)
        probe = getattr(exp.module, "probe", None)
        self._probe = probe if callable(probe) else None
        if cfg.divergence != "off":
            from .guard import DivergenceGuard

            self.guard = DivergenceGuard()
            # fp16: a step the scaler skipped (inf/NaN gradients) is the scaler's business, not a divergence
            self._guard_feed = ScalerAwareGuard(self.guard) if cfg.amp == "fp16" else self.guard
        if self.layer_stats_every:
            from .lab.diagnostics import LayerProbe

            self.layer_probe = LayerProbe(model, every=self.layer_stats_every)
        if cfg.early_stopping:
            from .lab.diagnostics import EarlyStopping

            self._early = EarlyStopping(cfg.early_stopping)
        self._watch = StepWatch(self.buffer, self._event, clip=self._clip, count_skips=cfg.amp == "fp16")
        if self.origin is not None:
            self._load_origin()
        if dist is not None:
            dist.prepared(self)

    def _make_updater(self) -> None:
        """An UpdateStep when the run needs more than a plain step (mixed precision, accumulation, clipping)."""
        cfg = self.config
        upd = UpdateStep(self.optimizer, self.device, amp=cfg.amp, accumulate=cfg.accumulate,
                         clip_grad_norm=self._clip)
        self._updater = None if upd.plain else upd

    def _set_clip(self, clip: float | None) -> None:
        """Clip to ``clip`` from the next step on (None: stop): the rows so far are counted against the old one."""
        if clip == self._clip:
            return
        self._flush_device()
        if self._watch is not None:
            self._watch.set_clip(clip)
        self._use_clip(clip)

    def _use_clip(self, clip: float | None) -> None:
        self._clip = clip
        upd = self._updater
        if upd is None:
            self._make_updater()
        else:
            upd.clip_grad_norm = clip
            if upd.plain:
                self._updater = None

    def _load_origin(self) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, RNG, step and data position.

        Everything is read and checked (the data position rebuilt too) before the store is touched,
        so a checkpoint that is refused leaves its run exactly as it was. A fork given no
        interventions of its own continues as its parent did: the parent's later interventions are
        applied at the same steps.
        """
        o = self.origin
        data = self._load_checkpoint(o.checkpoint)
        try:
            per_epoch = len(self._train_data)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        ckpt.check(data, o.checkpoint, step=o.step, groups=self.rates.groups, data_gens=self._data_gens,
                   batches_per_epoch=per_epoch)
        if "clip_grad_norm" in data:  # the threshold in force then (a steered one included)
            self._use_clip(data["clip_grad_norm"])
            self._watch.clip = self._clip
        self._restore_training_state(data, o.checkpoint)
        for what, part, key in (("guard", self.guard, "guard"), ("early stopping", self._early, "early_stopping"),
                                ("clipped/skipped step counts", self._watch, "step_watch")):
            if part is not None and data.get(key):
                try:
                    part.load_state_dict(data[key])
                except (LrvizError, TypeError, ValueError, KeyError, AttributeError) as exc:
                    raise ConfigError(f"checkpoint {o.checkpoint} is damaged: its {what} state cannot be "
                                      f"restored ({exc})") from None
        self.step = self._start_step = data["step"]
        self.epoch = data["epoch"]
        self._epoch_rng = data["epoch_rng"]
        drng = data.get("data_rng") or {}
        self._epoch_data_rng = drng.get("epoch")
        self._resume_iter = rebuild_position(
            self.experiment, self._train_data, o.checkpoint, epoch=self.epoch, batches=data["batch_in_epoch"],
            epoch_rng=self._epoch_rng, epoch_data_rng=self._epoch_data_rng, rng=data["rng"],
            data_now=drng.get("now"), data_gens=self._data_gens)
        self._time_offset = float(data.get("time", 0.0))
        self._bind_grads = data.get("flat_grads") is not False  # measure the gradients as the parent did
        origin = CheckpointInfo(Path(o.checkpoint), self.step, "origin", None)
        if o.kind == "resume" and self.store is not None:
            buffer, kept, validation, origin.seq = take_over_stored_run(self.store, o, self.step, self.rates.groups)
            self.buffer = buffer
            # in place: the app took these lists when it showed the run, before it started
            self.events.extend(kept)
            self.validation.extend(validation)
            self.rec.writer_start = (len(buffer), len(kept), len(validation))
        else:
            self.buffer = StepBuffer(groups=self.rates.groups, capacity=4096, first_step=self.step)
            if o.kind == "fork" and self.store is not None and not self._pending:
                self._pending = parent_interventions(self.store, o)
        self._watch.buffer = self.buffer
        self._watch.scanned = len(self.buffer)
        self._ckpts.add(origin)

    def _restore_training_state(self, data: dict[str, Any], path: str | Path) -> None:
        """Model, optimizer, LRs and schedule from a checkpoint (not RNG, step or data position)."""
        try:
            self.model.load_state_dict(data["model"])
            self.optimizer.load_state_dict(data["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"checkpoint {path} does not fit this script's model or optimizer: {exc}") from None
        self.rates.load_state_dict(data["lrs"], data.get("schedule"))
        if self._updater is not None:
            self._updater.load_state_dict(data.get("scaler"))

    def _open_run(self) -> None:
        if self.store is None:
            return
        exp = self.experiment
        o = self.origin
        if o is not None and o.kind == "resume":
            self.rec.open(run_id=o.run_id)
        else:
            origin = {"parent_id": o.run_id, "fork_step": o.step} if o is not None else {}
            self.rec.open(script_path=str(exp.path), script_hash=exp.source_hash, config=self.config.to_dict(),
                          device=str(self.device), name=self.name, **origin)
        if self._ckpts.folder is None:
            self._ckpts.folder = self.store.checkpoint_dir(self.run_id)

    # ---- checkpoints, roll-back, the guard ------------------------------------------------------------
    def _checkpoint(self, reason: str) -> CheckpointInfo:
        """Save everything needed to continue exactly from the current step; record an event."""
        self._flush_device()
        if self._epoch_rng is None:
            self._epoch_rng = capture_rng()
            self._epoch_data_rng = capture_generators(self._data_gens)
        buf = self.buffer
        loss = float(buf.view(len(buf) - 1)["loss"][-1]) if buf is not None and len(buf) else None
        rates = self.rates.state_dict()
        payload = {
            "format": ckpt.FORMAT, "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self._batch_in_epoch, "time": self.rec.clock(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lrs": rates["lrs"], "schedule": rates["schedule"],
            "rng": capture_rng(), "epoch_rng": self._epoch_rng,
            "data_rng": {"epoch": self._epoch_data_rng or {}, "now": capture_generators(self._data_gens)},
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "early_stopping": self._early.state_dict() if self._early is not None else None,
            "clip_grad_norm": self._clip,
            "scaler": self._updater.state_dict() if self._updater is not None else None,
            "step_watch": self._step_watch_state(),
            "flat_grads": None if self._gnorm is None or not self._gnorm.decided else self._gnorm.flat is not None,
        }
        info = self._ckpts.save(payload, reason, loss, self.events)
        self._event("checkpoint", {"path": str(info.path), "reason": reason,
                                   "loss": loss if loss is not None and math.isfinite(loss) else None})
        self._ckpts.prune(self.events, self.step)
        return info

    def _step_watch_state(self) -> dict[str, Any] | None:
        if self._watch is None:
            return None
        self._watch.scan()  # the rows were flushed just before
        return self._watch.state_dict()

    def _rollback(self, data: dict[str, Any]) -> dict[str, Any]:
        det = data.get("detection", self.detection)
        if data.get("path"):
            path = Path(data["path"])
            info = self._ckpts.find(path)
        else:
            margin = getattr(getattr(self.guard, "config", None), "oscillation_window", 20)

            def pick() -> CheckpointInfo:
                return self._ckpts.good(det, self.events, margin=margin, start_step=self._start_step)

            if self.dist is None:
                info = pick()
                path = info.path
            else:  # rank 0 keeps the checkpoints and chooses
                info, path = self.dist.pick_checkpoint(pick)
        saved = self._load_checkpoint(path)
        ckpt.check(saved, path, groups=self.rates.groups)
        self._flush_device()
        self._restore_training_state(saved, path)
        factor = float(data["lr_factor"])
        new_lr = self.lrs[0] * factor
        self.rates.set_lr(new_lr, self.step)
        if self.guard is not None:
            self.guard.reset()
        self.detection = None
        if info is not None:
            self._ckpts.forget_after(info)
        out = {"lr_factor": factor, "path": str(path), "to_step": int(saved["step"]), "lr": new_lr}
        if data.get("auto"):
            out["auto"] = True
        return out

    def _load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        if self.dist is None:
            return ckpt.load(path, map_location=self.device)
        return self.dist.load_checkpoint(path, self.device)  # rank 0's file, on every rank

    def _on_detection(self, det: Any) -> None:
        """The guard saw divergence or oscillation: stop, pause or roll back, as configured."""
        self.detection = det
        policy = self.config.divergence
        data = det.to_dict()
        if policy == "stop":
            if det.kind in ("nonfinite", "loss_explosion"):
                self._event("diverged", data, det.step)
                raise DivergedError(f"{det.message}: the learning rate ({self.lrs[0]:.3g}) is probably too high; "
                                    "try it about 10x lower, or --on-divergence rollback")
            self._event("warning", data, det.step)  # the guard itself stays quiet for this episode
            self.detection = None
        elif policy == "pause":
            self._event("diverged", data, det.step)
            self.control.pause()
        elif policy == "rollback":
            self._event("diverged", data, det.step)
            self._auto_rollbacks += 1
            if self._auto_rollbacks > 3:
                raise DivergedError(f"{det.message}; still diverging after 3 automatic roll-backs")
            try:  # marked automatic: a replay or a fork's guard rolls back by itself at the same step
                self._apply("rollback", {"lr_factor": 0.1, "detection": det, "auto": True})
            except ConfigError as exc:
                raise DivergedError(f"{det.message}; cannot roll back: {exc}") from None
        else:
            raise DivergedError(det.message)

    def _record_probe(self, step: int) -> None:
        try:
            values = self._probe(self.model)
        except Exception as exc:
            raise error_from_exception(exc, self.experiment.path, "probe()") from exc
        try:
            numbers = [(k, float(v)) for k, v in values.items()]
        except (AttributeError, TypeError, ValueError):
            exp = self.experiment
            raise ScriptError(f"probe() returned {failure.clip_repr(values)} at step {step}; it must return a dict of "
                              "names to numbers, e.g. {'x': 0.5}", str(exp.path), exp.line_of("probe")) from None
        self.rec.record_probe(step, numbers)

    def _run_range_test(self, data: dict[str, Any], kind: str = "range_test") -> None:
        from .lab.rangetest import confirm_rates, range_test

        fut: Future = data["future"]
        if not fut.set_running_or_notify_cancel():
            return
        self._range_cancel = False
        common = {"device": self.device, "should_stop": lambda: self.control.stop_requested or self._range_cancel}
        data_order = capture_generators(self._data_gens)  # the test draws batches; training must not notice
        kwargs = {"amp": self.config.amp, "accumulate": self.config.accumulate, "clip_grad_norm": self._clip,
                  **data["kwargs"]}  # each test (or confirmation) step made as the run makes its steps
        try:
            self._flush_device()
            if kind == "confirm_lr":
                result = confirm_rates(self.model, self.optimizer, self._train_data, self._loss_of, **common,
                                       **kwargs)
            else:
                self.range_test_progress = []
                progress = self.range_test_progress
                result = range_test(
                    self.model, self.optimizer, self._train_data, self._loss_of, **common,
                    on_step=lambda i, lr, loss: progress.append((lr, loss)), **kwargs)
        except LrvizError as exc:  # reported through the future; training goes on
            fut.set_exception(exc)
            return
        except Exception as exc:
            fut.set_exception(error_from_exception(exc, self.experiment.path, "the range test"))
            return
        finally:
            restore_generators(self._data_gens, data_order)
        if kind == "confirm_lr":
            w = result.winner
            self._event("range_test", {"suggestion": None if w is None else w.lr, "method": "confirmed",
                                       "reason": result.reason, "steps": result.steps})
        else:
            s = result.suggestions
            self._event("range_test", {"suggestion": s.best, "method": s.chosen, "reason": s.reason,
                                       "steps": len(result.lrs)})
        fut.set_result(result)

    def _publish(self) -> None:
        """Write the rows recorded since the last flush (a stop, an error): kept, not judged again."""
        if self._staging is not None:
            try:
                self._staging.publish(self.rec.clock())
            except Exception:  # a device that failed mid-run: what was written stays
                log.exception("could not copy the last steps from the device")

    def _finish(self) -> None:
        self._publish()
        if self._watch is not None:
            self._watch.scan()
        if self.dist is not None:
            self.dist.ended(self)
        self.control.close(str(self.state), self.step)
        self.rec.close(self.summary(), str(self.error) if self.error else None)
        self.done.set()

    def summary(self) -> dict[str, Any]:
        """Figures of the run so far: steps, best/final loss, best/final validation loss, speed."""
        out = self.rec.summary(self.step, has_validation=self._val_data is not None)
        if self._watch is not None:
            out.update(self._watch.summary())
        if self.error is not None:
            out["error"] = str(self.error)
        if self.ranks_in_sync is not None:
            out["ranks_in_sync"] = self.ranks_in_sync
        return out

    def abandon(self, err: LrvizError) -> None:
        """End the run as failed from another thread, when its loop cannot end by itself (a collective
        of a distributed run that waits on a rank that failed)."""
        if self.done.is_set():
            return
        self.state = "failed"
        self.error = err
        self._event("error", {"message": str(err)})
        self._finish()

    # ---- between steps --------------------------------------------------------------------------------
    def _event(self, kind: str, data: dict[str, Any], step: int | None = None) -> Event:
        return self.rec.event(kind, data, self.step if step is None else step)

    # ---- training -------------------------------------------------------------------------------------
    def _train(self) -> None:
        cfg = self.config
        exp = self.experiment
        model = self.model if self._train_model is None else self._train_model
        opt = self.optimizer
        assert model is not None and opt is not None and self.buffer is not None
        device = self.device
        move = device is not None and device.type != "cpu"
        on_host = not move if self.stage_on_device is None else not self.stage_on_device
        train = self._train_data
        loss_of = self._loss_of
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        gnorm = self._gnorm = GradNorm(params, bind=self._bind_grads)
        flat = None
        upd = self._updater  # None: a plain step (refreshed wherever a command may change it)
        if self.dist is None:
            staging = self._staging = Staging(self.buffer, device, on_host)
        else:
            staging = self._staging = self.dist.staging(
                self.buffer, device, self.control, check=self._check_flushed,
                align=self.checkpoint_every if self._ckpts.folder is not None else None)
        control = self.control
        rates = self.rates
        max_steps = cfg.steps
        max_epochs = cfg.epochs
        eval_every = cfg.eval_every
        has_val = self._val_data is not None
        ckpts = self._ckpts
        ckpt_every = self.checkpoint_every if ckpts.folder is not None else None
        guard = self._guard_feed
        probe = self._probe
        layers = self.layer_probe
        first = True
        perf = time.perf_counter
        t0 = self.rec.t0
        model.train()
        self.state = "running"
        if ckpts.folder is not None and ckpts.last_step != self.step:
            self._checkpoint("start")
        while max_epochs is None or self.epoch < max_epochs:
            if self._resume_iter is not None:  # continuing a checkpoint's epoch (rebuilt by _load_origin)
                it, batches = self._resume_iter
                self._resume_iter = None
            else:
                batches = 0
                if ckpts.folder is not None:
                    self._epoch_rng = capture_rng()
                    self._epoch_data_rng = capture_generators(self._data_gens)
                it = iter(train)
            while True:
                if control.attention:
                    self._batch_in_epoch = batches
                    self._attend()
                    upd = self._updater
                step = self.step
                if self._pending and self._pending[0].step <= step:
                    self._apply_due()
                    upd = self._updater
                if ckpt_every and step % ckpt_every == 0 and step != ckpts.last_step:
                    self._batch_in_epoch = batches
                    self._checkpoint("periodic")
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except Exception as exc:
                    raise error_from_exception(
                        exc, exp.path, f"iterating the training data (epoch {self.epoch + 1})") from exc
                lrs = rates.at_step(step)
                if move:
                    batch = to_device(batch, device)
                if upd is not None:  # mixed precision, accumulation or clipping
                    loss, gn2, taken, ran_out = self._update(upd, batch, it, step, first)
                    batches += taken - 1
                    if ran_out:  # the epoch's batches ran out inside this update
                        it = iter(())
                else:
                    try:
                        if flat is not None:
                            flat.zero_()
                        else:
                            opt.zero_grad(set_to_none=True)
                        loss = loss_of(model, batch)
                        if first:
                            self._check_loss(loss)
                        loss.backward()
                        gn2 = gnorm.squared()
                        if layers is not None:
                            layers.before_step(step)
                        opt.step()
                        if layers is not None:
                            layers.after_step(step)
                    except LrvizError:
                        raise
                    except Exception as exc:
                        raise exp.describe_batch_error(
                            exc, batch, f"training step {step} (epoch {self.epoch + 1})") from exc
                if first:
                    first = False
                    flat = gnorm.flat  # bound after the first step when every parameter got a gradient
                batches += 1
                now = perf() - t0
                self.step = step + 1
                if on_host:
                    lf, gn = staging.record_host(self.epoch, now, loss, gn2, lrs)
                    if guard is not None:
                        det = guard.update(step, lf, gn)
                        if det is not None:
                            self._on_detection(det)
                    elif not math.isfinite(lf):
                        self._diverged(step, lf)
                else:
                    flushed = staging.stage(self.epoch, now, loss, gn2, lrs)
                    if flushed is not None:
                        self._check_flushed(*flushed)
                if probe is not None:
                    self._record_probe(step)
                if control.pace is not None:
                    control.wait_for_pace(now)
                if control.step_budget is not None:
                    control.count_step()
                if eval_every is not None and has_val and self.step % eval_every == 0:
                    self._validate()
                if max_steps is not None and self.step >= max_steps:
                    self._end_of_training(has_val)
                    return
            if batches == 0:
                what = "in epoch 1" if self.epoch == 0 else (
                    f"in epoch {self.epoch + 1} (was it a one-shot iterator?)")
                raise ScriptError(f"build_data()'s training data yielded no batches {what}", str(exp.path),
                                  exp.line_of("build_data"))
            self.epoch += 1
            if eval_every is None and has_val:
                self._validate()
        self._end_of_training(has_val)

    def _end_of_training(self, has_val: bool) -> None:
        """Flush, and validate the final weights unless that was just done."""
        self._flush_device()
        last_val = self.validation[-1].step if self.validation else -1
        if has_val and last_val != self.step - 1:
            self._validate()

    def _update(self, upd: UpdateStep, batch: Any, it: Any, step: int,
                first: bool) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """Step ``step`` as one update over up to ``accumulate`` micro-batches, ``batch`` (on the device)
        the first, the rest drawn from ``it``; mixed precision and clipping as configured.

        Returns the mean loss of the micro-batches (a 0-d tensor), the squared gradient norm before
        clipping, the number of batches taken and whether the epoch's batches ran out before
        ``accumulate`` of them (the update is then the mean of those taken).
        """
        exp = self.experiment
        model = self.model if self._train_model is None else self._train_model  # DDP reduces the gradients
        gnorm, layers = self._gnorm, self.layer_probe
        n = upd.accumulate
        ddp = model is not self.model and hasattr(model, "no_sync")  # micro-batches but the last: no_sync
        total = None
        taken = 0
        ran_out = False
        if self._watch is not None:
            self._watch.scan()  # the rows published since the last update
        try:
            if gnorm.flat is not None:
                gnorm.flat.zero_()
            else:
                self.optimizer.zero_grad(set_to_none=True)
            while True:
                with upd.autocast():
                    loss = self._loss_of(model, batch)
                if first and not taken:
                    self._check_loss(loss)
                # The next micro-batch is drawn before this backward (no random numbers are drawn in
                # between, so the order is the same), so that under DDP only the update's last backward
                # reduces the gradients across ranks: the others accumulate locally (no_sync), as
                # Lightning and Hugging Face accumulate.
                following = None
                if taken + 1 < n:
                    try:
                        following = next(it)
                    except StopIteration:
                        ran_out = True
                    except Exception as exc:
                        raise error_from_exception(
                            exc, exp.path, f"iterating the training data (epoch {self.epoch + 1})") from exc
                with model.no_sync() if ddp and following is not None else contextlib.nullcontext():
                    upd.backward(loss)
                lv = loss.detach()
                if lv.dtype in _HALF:
                    lv = lv.float()
                total = lv if total is None else total + lv
                taken += 1
                if following is None:
                    break
                batch = following
                if self.device is not None and self.device.type != "cpu":
                    batch = to_device(batch, self.device)
            gn2 = upd.finish(gnorm, taken)
            if layers is not None:
                layers.before_step(step)
            upd.step()
            if layers is not None:
                layers.after_step(step)
        except LrvizError:
            raise
        except Exception as exc:
            micro = f", micro-batch {min(taken + 1, n)} of {n}" if n > 1 else ""
            raise exp.describe_batch_error(
                exc, batch, f"training step {step} (epoch {self.epoch + 1}{micro})") from exc
        return (total if taken == 1 else total / taken), gn2, taken, ran_out

    def _check_loss(self, loss: Any) -> None:
        exp = self.experiment
        fn = exp.loss_name + "()"
        where = (str(exp.path), exp.line_of(exp.loss_name))
        if not isinstance(loss, torch.Tensor):
            raise ScriptError(f"{fn} returned {type(loss).__name__}; it must return a scalar torch.Tensor", *where)
        if loss.numel() != 1:
            raise ScriptError(f"{fn} returned a tensor of shape {list(loss.shape)}; it must return a scalar "
                              "(reduce it with .mean())", *where)
        if not loss.requires_grad:
            raise ScriptError(f"{fn} returned a tensor that does not require grad; compute it from the model's "
                              "output without .detach() or torch.no_grad()", *where)

    def _diverged(self, step: int, value: float, what: str = "loss") -> None:
        msg = (f"the {what} became {value} at step {step}: the learning rate "
               f"({self.lrs[0]:.3g}) is probably too high for this model")
        self._event("diverged", {"message": msg, "value": str(value)}, step)
        if self.stop_on_divergence:
            raise DivergedError(msg)

    # ---- device staging: no host sync per step on an accelerator ---------------------------------------
    def _flush_device(self) -> None:
        staging = self._staging
        if staging is not None:
            flushed = staging.flush(self.rec.clock())
            if flushed is not None:
                self._check_flushed(*flushed)

    def _check_flushed(self, first_step: int, loss: np.ndarray, grad_norm: np.ndarray) -> None:
        """Rows just copied from the device: the guard (or a plain non-finite check) looks at them."""
        guard = self._guard_feed
        if guard is not None:
            det = guard.update_many(first_step, loss, grad_norm)
            if det is not None:
                self._on_detection(det)
            return
        bad = np.flatnonzero(~np.isfinite(loss))
        if bad.size:
            self._diverged(first_step + int(bad[0]), float(loss[bad[0]]))

    # ---- validation -----------------------------------------------------------------------------------
    def _validate(self) -> None:
        self._flush_device()

        def check_stop() -> None:
            if self.control.stop_requested and self.dist is None:  # across ranks: at the next agreed step
                raise Stopped

        upd = self._updater
        with upd.autocast() if upd is not None else contextlib.nullcontext():  # the training's precision
            vloss, acc = validate(self.experiment, self.model, self._val_data, self.device,
                                  after_step=self.step - 1, check_stop=check_stop)
        if self.dist is not None:
            vloss, acc = self.dist.agree_validation(vloss, acc)
        self.validation.append(ValPoint(self.step - 1, self.epoch, vloss, acc, self.rec.clock()))
        if math.isfinite(vloss) and self.rates.observe_validation(vloss, self.step):
            self._event("lr_reduced", {"lr": self.lrs[0], "val_loss": vloss})
        if self._early is not None and math.isfinite(vloss) and self._early.update(vloss):
            self._event("early_stop", {"patience": self.config.early_stopping, "best_val_loss": self._early.best})
            raise _EarlyStop
