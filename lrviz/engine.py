"""The training engine: trains an experiment step by step, steerable from any thread.

Data flows one way. The engine appends per-step records to a :class:`StepBuffer`, events and
validation points to plain lists, and (through a :class:`StoreWriter`) to the run store. Other
threads call ``pause``/``resume``/``step_once``/``stop``/``set_lr``/``set_schedule``/
``set_hyperparams``; those only queue a command and raise one flag, which the loop checks once per
step. Nothing in the engine waits on a reader.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import interventions as iv
from .checkpoint import capture_rng, restore_rng
from .config import RunConfig
from .devices import resolve_device, to_device
from .errors import ConfigError, DivergedError, LrvizError, ScriptError
from .experiment import Experiment, error_from_exception
from .optim import apply_hyperparams, build_optimizer
from .records import Event, StepBuffer, ValPoint

log = logging.getLogger(__name__)

TERMINAL_STATES = ("finished", "stopped", "diverged", "failed")
#: On an accelerator, losses stay on the device and are copied in one transfer per this many steps
#: (or per FLUSH_SECONDS, whichever comes first).
DEVICE_STAGE_STEPS = 256
FLUSH_SECONDS = 0.1


class _Stop(Exception):
    """Raised inside the loop when a stop was requested."""


class _EarlyStop(Exception):
    """Raised when early stopping ends the run (it then counts as finished)."""


@dataclass
class Origin:
    """Where a run continues from: ``fork`` (a new child run) or ``resume`` (the same run) of
    run ``run_id`` at the checkpoint file ``checkpoint`` taken before step ``step``."""

    kind: str
    run_id: int
    checkpoint: Path
    step: int


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class _GradNorm:
    """Gradient norm per step, cheaply.

    After a first ordinary step shows every parameter receives a gradient, the gradients are bound
    as views into one flat buffer: zeroing is one kernel and the squared norm one dot product.
    Otherwise it falls back to ``zero_grad(set_to_none=True)`` and a foreach norm.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.flat: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        self.decided = False

    def zero(self, optimizer: torch.optim.Optimizer) -> None:
        if self.flat is not None:
            self.flat.zero_()
        else:
            optimizer.zero_grad(set_to_none=True)

    def squared(self) -> torch.Tensor:
        flat = self.flat
        if flat is not None:
            for p, g in zip(self.params, self.views):
                if p.grad is not g:  # the script replaced a gradient: bind it again
                    self._rebind(p, g)
            return torch.dot(flat, flat)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not self.decided:
            self.decided = True
            self._try_bind()
        if not grads:
            return torch.zeros((), device=self.params[0].device)
        norms = torch._foreach_norm(grads)
        return torch.stack(norms).square().sum()

    def _rebind(self, p: torch.nn.Parameter, view: torch.Tensor) -> None:
        if p.grad is not None:
            view.copy_(p.grad)
        else:
            view.zero_()
        p.grad = view

    def _try_bind(self) -> None:
        ps = self.params
        if not ps or any(p.grad is None or p.grad.is_sparse for p in ps):
            return
        if len({(p.dtype, p.device) for p in ps}) != 1:
            return
        flat = torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
        views, off = [], 0
        for p in ps:
            v = flat[off:off + p.numel()].view_as(p)
            v.copy_(p.grad)
            p.grad = v
            views.append(v)
            off += p.numel()
        self.flat, self.views = flat, views


class TrainingEngine:
    """Trains ``experiment`` with ``config``; records every step; obeys commands from any thread.

    Use ``start()`` for a background thread (the app) or ``run()`` to train in the calling thread
    (the CLI). ``state`` is one of idle, preparing, running, paused, finished, stopped, diverged,
    failed. ``error`` holds the :class:`LrvizError` of a failed run, ``error_detail`` its traceback.
    """

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
    ):
        self.experiment = experiment
        self.config = config.validated()
        self.store = store
        self.name = name
        self.stop_on_divergence = stop_on_divergence
        #: Keep losses on the device and copy them per flush (default: on any accelerator).
        self.stage_on_device = stage_on_device
        self.state = "idle"
        self.error: LrvizError | None = None
        self.error_detail = ""
        self.run_id: int | None = None
        self.device: torch.device | None = None
        self.buffer: StepBuffer | None = None
        self.events: list[Event] = []
        self.validation: list[ValPoint] = []
        self.step = 0  # the index of the next step
        self.epoch = 0
        self.total_steps: int | None = config.steps
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: Any = None
        self.schedule_start = 0
        self.lrs: list[float] = []
        self.done = threading.Event()
        self._pending = sorted(interventions)
        self._cond = threading.Condition()
        self._commands: deque[tuple[str, dict[str, Any]]] = deque()
        self._attention = start_paused
        self._pause_requested = start_paused
        self._stop_requested = False
        self._step_budget: int | None = None
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()
        self._writer: Any = None
        self._train_data: Any = None
        self._val_data: Any = None
        self._staged = 0
        self._stage_loss: torch.Tensor | None = None
        self.origin = origin
        self.checkpoint_every = self.config.checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self._checkpoint_dir: Path | None = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoints: list[Any] = []  # CheckpointInfo, oldest first
        self._last_ckpt_step = -1
        self._batch_in_epoch = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._resume_skip: int | None = None
        self._time_offset = 0.0
        self.guard: Any = None
        self.detection: Any = None  # the guard's last Detection, until a roll-back or resume
        self._auto_rollbacks = 0
        self.layer_stats_every = layer_stats_every
        self.layer_probe: Any = None
        self._early: Any = None
        self._probe: Any = None
        self.probe_steps: list[int] = []
        self.probe_values: dict[str, list[float]] = {}
        self.range_test_progress: list[tuple[float, float]] = []
        self._range_cancel = False
        self._pace: float | None = self.config.pace
        self._writer_start = (0, 0, 0)

    # ---- control, from any thread -------------------------------------------------------------
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

    def _signal(self, **flags: Any) -> None:
        with self._cond:
            for k, v in flags.items():
                setattr(self, k, v)
            self._attention = True
            self._cond.notify_all()

    def pause(self) -> None:
        """Pause before the next step (blocks the training thread on a condition, no busy loop)."""
        self._signal(_pause_requested=True)

    def resume(self) -> None:
        """Resume a paused run (a divergence the guard reported is then considered handled)."""
        self.detection = None
        self._signal(_pause_requested=False, _step_budget=None)

    def step_once(self) -> None:
        """Run exactly one step, then pause."""
        self._signal(_pause_requested=False, _step_budget=1)

    def stop(self) -> None:
        """Stop at the next step boundary (or between validation batches)."""
        self._signal(_stop_requested=True)

    def set_pace(self, steps_per_second: float | None) -> None:
        """Slow motion: at most this many steps a second (None or 0: full speed). Takes effect at once."""
        pace = float(steps_per_second) if steps_per_second else None
        if pace is not None and not (math.isfinite(pace) and pace > 0):
            raise ConfigError(f"pace must be a number of steps per second > 0, not {steps_per_second!r}")
        self._signal(_pace=pace)

    def set_lr(self, lr: Any) -> None:
        """Use ``lr`` from the next step on (a running schedule is rescaled to continue from it)."""
        self._command("set_lr", {"lr": lr})

    def set_schedule(self, spec: str | None) -> None:
        """Start schedule ``spec`` at the next step, from the current rate (None: constant rate)."""
        self._command("set_schedule", {"spec": spec})

    def set_hyperparams(self, momentum: float | None = None, weight_decay: float | None = None) -> None:
        """Change momentum (beta1 for Adam-like optimizers) and/or weight decay from the next step on."""
        data = iv.check("set_hyperparams", {"momentum": momentum, "weight_decay": weight_decay})
        opt = self.optimizer
        if opt is not None:
            g = opt.param_groups[0]
            if "momentum" in data and "momentum" not in g and "betas" not in g:
                raise ConfigError(f"{type(opt).__name__} has no momentum to change")
        self._command("set_hyperparams", data)

    def rollback(self, lr_factor: float = 0.1, checkpoint: str | Path | None = None) -> None:
        """Restore the last good checkpoint's weights and optimizer state and continue with LR x ``lr_factor``.

        Steps keep counting forward (the plot shows the jump back); recorded as a 'rollback' event.
        """
        data: dict[str, Any] = {"lr_factor": lr_factor}
        if checkpoint is not None:
            data["path"] = str(checkpoint)
        self._command("rollback", data)

    def range_test(self, **kwargs: Any) -> Future:
        """Run the LR range test on the current weights between two steps (best while paused).

        Keyword arguments go to :func:`lrviz.rangetest.range_test` (start, end, steps, beta,
        stop_factor). Model, optimizer and RNG are restored exactly afterwards. Returns a Future
        holding the RangeTestResult; ``range_test_progress`` fills with (lr, loss) while it runs.
        """
        return self._lab_command("range_test", kwargs)

    def confirm_lr(self, **kwargs: Any) -> Future:
        """Confirm candidate rates on the current weights between two steps, like :meth:`range_test`.

        Keyword arguments go to :func:`lrviz.rangetest.confirm_rates` (rates, steps, stop_factor,
        on_step). Model, optimizer and RNG are restored exactly afterwards. Returns a Future holding
        the Confirmation; :meth:`cancel_range_test` ends it early.
        """
        return self._lab_command("confirm_lr", kwargs)

    def _lab_command(self, kind: str, kwargs: dict[str, Any]) -> Future:
        fut: Future = Future()
        with self._cond:
            self._commands.append((kind, {"kwargs": kwargs, "future": fut}))
            self._attention = True
            self._cond.notify_all()
        return fut

    def cancel_range_test(self) -> None:
        """Stop a running range test early (its state is restored as usual)."""
        self._range_cancel = True

    def _command(self, kind: str, data: dict[str, Any]) -> None:
        data = iv.check(kind, data)  # errors reach the caller, in its own thread
        if kind == "set_schedule" and data["spec"] is not None:
            self._check_schedule_usable(data["spec"])
        with self._cond:
            self._commands.append((kind, data))
            self._attention = True
            self._cond.notify_all()

    def _check_schedule_usable(self, spec: str) -> None:
        prepared = self.model is not None
        if spec.lower().startswith("reducelronplateau") and prepared and self._val_data is None:
            raise ConfigError("ReduceLROnPlateau steps on validation loss, and this script's build_data() "
                              "returns no validation data; return (train, val) to use it")

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> str:
        """Prepare and train in the calling thread; return the final state."""
        self._t0 = time.perf_counter()
        try:
            self.state = "preparing"
            self._prepare()
            self._open_run()
            # the time column counts from the start of training (continuing a checkpoint's time)
            self._t0 = time.perf_counter() - self._time_offset
            if self._stop_requested:
                raise _Stop
            self._train()
            self.state = "finished"
        except _Stop:
            self.state = "stopped"
            self._event("stop", {})
        except _EarlyStop:
            self.state = "finished"
        except DivergedError as exc:
            self.state = "diverged"
            self.error = exc
        except LrvizError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug in the user's code we could not place, or ours
            err = error_from_exception(exc, self.experiment.path, "training")
            if err.line is None:
                err = LrvizError(f"internal error in lrviz: {type(exc).__name__}: {exc} "
                                 "(please report it; --debug shows the traceback)")
                err.__cause__ = exc
            self._fail(err, exc)
        finally:
            self._finish()
        return self.state

    def _fail(self, err: LrvizError, exc: BaseException | None = None) -> None:
        self.state = "failed"
        self.error = err
        cause = exc or err.__cause__ or err
        self.error_detail = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
        self._event("error", {"message": str(err)})
        log.debug("run failed: %s", self.error_detail)

    def _prepare(self) -> None:
        cfg = self.config
        exp = self.experiment
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        model = exp.make_model(cfg.params).to(self.device)
        train, val = exp.make_data(cfg.batch_size, cfg.params)
        self._train_data, self._val_data = train, val
        opt = exp.make_optimizer(model, cfg.lr)
        if opt is None:
            opt = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                                  cfg.weight_decay, cfg.nesterov)
        self.model, self.optimizer = model, opt
        self.lrs = [float(g["lr"]) for g in opt.param_groups]
        self.buffer = StepBuffer(groups=len(self.lrs), capacity=max(4096, min(cfg.steps or 0, 1 << 20)))
        self._loss_of = exp.loss_function()
        if cfg.steps is None:
            try:
                self.total_steps = len(train) * (cfg.epochs or 1)  # type: ignore[arg-type]
            except TypeError:
                self.total_steps = None
        if cfg.schedule:
            if cfg.schedule.lower().startswith("reducelronplateau") and val is None:
                raise ConfigError("schedule ReduceLROnPlateau steps on validation loss, and this script's "
                                  "build_data() returns no validation data; return (train, val) to use it")
            self._start_schedule(cfg.schedule, 0)
        probe = getattr(exp.module, "probe", None)
        self._probe = probe if callable(probe) else None
        if cfg.divergence != "off":
            from .guard import DivergenceGuard

            self.guard = DivergenceGuard()
        if self.layer_stats_every:
            from .diagnostics import LayerProbe

            self.layer_probe = LayerProbe(model, every=self.layer_stats_every)
        if cfg.early_stopping:
            from .diagnostics import EarlyStopping

            self._early = EarlyStopping(cfg.early_stopping)
        if self.origin is not None:
            self._load_origin()

    def _load_origin(self) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, RNG, step and data position."""
        from . import checkpoint as ckpt

        o = self.origin
        data = ckpt.load(o.checkpoint, map_location=self.device)
        self._restore_training_state(data)
        self.step = int(data["step"])
        self.epoch = int(data["epoch"])
        self._resume_skip = int(data["batch_in_epoch"])
        self._epoch_rng = data["epoch_rng"]
        self._resume_rng = data["rng"]
        self._time_offset = float(data.get("time", 0.0))
        self._last_ckpt_step = self.step
        if self.guard is not None and data.get("guard"):
            self.guard.load_state_dict(data["guard"])
        if self._early is not None and data.get("early_stopping"):
            self._early.load_state_dict(data["early_stopping"])
        groups = len(self.lrs)
        if o.kind == "resume" and self.store is not None:
            self.store.truncate_run(o.run_id, self.step)
            self.buffer = StepBuffer.from_columns(self.store.load_steps(o.run_id))
            self.events = self.store.load_events(o.run_id)
            self.validation = self.store.load_validation(o.run_id)
            self._writer_start = (len(self.buffer), len(self.events), len(self.validation))
            if self.buffer.groups != groups:
                raise ConfigError("the stored run has another number of param groups than the script now builds")
        else:
            self.buffer = StepBuffer(groups=groups, capacity=4096, first_step=self.step)

    def _restore_training_state(self, data: dict[str, Any]) -> None:
        """Model, optimizer, LRs and schedule from a checkpoint (not RNG, step or data position)."""
        from .schedules import Schedule

        try:
            self.model.load_state_dict(data["model"])
            self.optimizer.load_state_dict(data["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"the checkpoint does not fit this script's model or optimizer: {exc}") from None
        self.lrs = [float(x) for x in data["lrs"]]
        self._set_group_lrs(self.lrs)
        sched = data.get("schedule")
        if sched is None:
            self.schedule = None
        else:
            self.schedule = Schedule.from_state_dict(sched["state"])
            self.schedule_start = int(sched["start"])

    def _open_run(self) -> None:
        if self.store is None:
            return
        from .writer import StoreWriter

        exp = self.experiment
        o = self.origin
        if o is not None and o.kind == "resume":
            self.run_id = o.run_id
        else:
            origin = {"parent_id": o.run_id, "fork_step": o.step} if o is not None else {}
            self.run_id = self.store.create_run(
                script_path=str(exp.path), script_hash=exp.source_hash, config=self.config.to_dict(),
                device=str(self.device), name=self.name, **origin,
            )
        self.store.set_status(self.run_id, "running")
        if self._checkpoint_dir is None:
            self._checkpoint_dir = self.store.checkpoint_dir(self.run_id)
        self._writer = StoreWriter(self.store, self.run_id, self, start=self._writer_start)
        self._writer.start()

    # ---- checkpoints, roll-back, the guard ---------------------------------------------------------
    def _checkpoint(self, reason: str) -> Any:
        """Save everything needed to continue exactly from the current step; record an event."""
        from . import checkpoint as ckpt

        self._flush_device()
        if self._epoch_rng is None:
            self._epoch_rng = capture_rng()
        sched = self.schedule
        buf = self.buffer
        loss = float(buf.view(len(buf) - 1)["loss"][-1]) if buf is not None and len(buf) else None
        payload = {
            "format": ckpt.FORMAT, "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self._batch_in_epoch, "time": time.perf_counter() - self._t0,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lrs": list(self.lrs),
            "schedule": None if sched is None else {"start": self.schedule_start, "state": sched.state_dict()},
            "rng": capture_rng(), "epoch_rng": self._epoch_rng,
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "early_stopping": self._early.state_dict() if self._early is not None else None,
        }
        path = self._checkpoint_dir / f"step-{self.step:09d}-{reason}.pt"
        ckpt.save(path, payload)
        info = ckpt.CheckpointInfo(path, self.step, reason, loss)
        self.checkpoints.append(info)
        self._last_ckpt_step = self.step
        self._event("checkpoint", {"path": str(path), "reason": reason,
                                   "loss": loss if loss is not None and math.isfinite(loss) else None})
        periodic = [c for c in self.checkpoints if c.reason == "periodic"]
        for old in periodic[:-self.keep_checkpoints] if self.keep_checkpoints else []:
            try:
                old.path.unlink()
            except OSError:
                pass
            self.checkpoints.remove(old)
        return info

    def _good_checkpoint(self) -> Any:
        """The latest checkpoint from before the trouble the guard saw (or before now)."""
        if self.detection is not None:
            margin = getattr(getattr(self.guard, "config", None), "oscillation_window", 20)
            limit = self.detection.step - margin
        else:
            limit = self.step
        usable = [c for c in self.checkpoints if c.path.exists()
                  and (c.loss is None or math.isfinite(c.loss))]
        before = [c for c in usable if c.step <= limit]
        if before:
            return before[-1]
        if usable:
            return usable[0]
        raise ConfigError("there is no checkpoint to roll back to (checkpoints are kept only for runs "
                          "saved in a store)")

    def _rollback(self, data: dict[str, Any]) -> dict[str, Any]:
        from . import checkpoint as ckpt

        if data.get("path"):
            path = Path(data["path"])
            saved = ckpt.load(path, map_location=self.device)
        else:
            info = self._good_checkpoint()
            path = info.path
            saved = ckpt.load(path, map_location=self.device)
        self._flush_device()
        self._restore_training_state(saved)
        factor = float(data["lr_factor"])
        new_lr = self.lrs[0] * factor
        self._apply_lr(new_lr)
        if self.guard is not None:
            self.guard.reset()
        self.detection = None
        return {"lr_factor": factor, "path": str(path), "to_step": int(saved["step"]), "lr": new_lr}

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
            with self._cond:
                self._pause_requested = True
                self._attention = True
        elif policy == "rollback":
            self._event("diverged", data, det.step)
            self._auto_rollbacks += 1
            if self._auto_rollbacks > 3:
                raise DivergedError(f"{det.message}; still diverging after 3 automatic roll-backs")
            self._apply("rollback", {"lr_factor": 0.1})
        else:
            raise DivergedError(det.message)

    def _record_probe(self, step: int) -> None:
        try:
            values = self._probe(self.model)
        except Exception as exc:
            raise error_from_exception(exc, self.experiment.path, "probe()") from exc
        self.probe_steps.append(step)
        for k, v in values.items():
            self.probe_values.setdefault(k, []).append(float(v))

    def _run_range_test(self, data: dict[str, Any], kind: str = "range_test") -> None:
        from .rangetest import confirm_rates, range_test

        fut: Future = data["future"]
        if not fut.set_running_or_notify_cancel():
            return
        self._range_cancel = False
        common = {"device": self.device, "should_stop": lambda: self._stop_requested or self._range_cancel}
        try:
            self._flush_device()
            if kind == "confirm_lr":
                result = confirm_rates(self.model, self.optimizer, self._train_data, self._loss_of, **common,
                                       **data["kwargs"])
            else:
                self.range_test_progress = []
                progress = self.range_test_progress
                result = range_test(
                    self.model, self.optimizer, self._train_data, self._loss_of, **common,
                    on_step=lambda i, lr, loss: progress.append((lr, loss)), **data["kwargs"])
        except LrvizError as exc:  # reported through the future; training goes on
            fut.set_exception(exc)
            return
        except Exception as exc:
            fut.set_exception(error_from_exception(exc, self.experiment.path, "the range test"))
            return
        if kind == "confirm_lr":
            w = result.winner
            self._event("range_test", {"suggestion": None if w is None else w.lr, "method": "confirmed",
                                       "reason": result.reason, "steps": result.steps})
        else:
            s = result.suggestions
            self._event("range_test", {"suggestion": s.best, "method": s.chosen, "reason": s.reason,
                                       "steps": len(result.lrs)})
        fut.set_result(result)

    def _finish(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close(self.state, self.summary(), str(self.error) if self.error else None)
            except Exception:  # the store must never turn a run's end into a crash
                log.exception("could not save the end of the run")
        self.done.set()

    def summary(self) -> dict[str, Any]:
        """Figures of the run so far: steps, best/final loss, best/final validation loss, speed."""
        out: dict[str, Any] = {"steps": self.step, "state": self.state}
        if self.buffer is not None and len(self.buffer):
            v = self.buffer.view()
            loss = v["loss"]
            finite = loss[np.isfinite(loss)]
            out["final_loss"] = float(loss[-1])
            out["best_loss"] = float(finite.min()) if finite.size else None
            dt = float(v["time"][-1])
            out["seconds"] = dt
            out["steps_per_s"] = len(loss) / dt if dt > 0 else None
        if self.validation:
            vals = [p.loss for p in self.validation if math.isfinite(p.loss)]
            out["final_val_loss"] = self.validation[-1].loss
            out["best_val_loss"] = min(vals) if vals else None
            if self.validation[-1].accuracy is not None:
                out["final_val_accuracy"] = self.validation[-1].accuracy
        if self.buffer is not None and len(self.buffer):
            from .diagnostics import run_generalization

            v = self.buffer.view()
            out["generalization"] = run_generalization(v["step"], v["loss"], list(self.validation),
                                                       self._val_data is not None)
        if self.error is not None:
            out["error"] = str(self.error)
        return out

    # ---- between steps ----------------------------------------------------------------------------
    def _event(self, kind: str, data: dict[str, Any], step: int | None = None) -> Event:
        e = Event(self.step if step is None else step, kind, data, time.perf_counter() - self._t0)
        self.events.append(e)
        return e

    def _attend(self) -> None:
        """Apply queued commands; wait while paused; raise _Stop on stop.

        Commands run outside the lock (a checkpoint or a range test may take a while), so other
        threads never block on the engine.
        """
        paused = False
        while True:
            with self._cond:
                self._attention = False
                commands = list(self._commands)
                self._commands.clear()
            self._apply_commands(commands)
            with self._cond:
                if self._stop_requested:
                    raise _Stop
                if not self._pause_requested:
                    break
                if paused and not self._commands:
                    self._cond.wait()
                    continue
            if not paused:
                paused = True
                self._flush_device()
                self.state = "paused"
                self._event("pause", {})
                self._on_pause()
        if paused:
            self.state = "running"
            self._event("resume", {})

    def _on_pause(self) -> None:
        if self._checkpoint_dir is not None and self.model is not None and self._last_ckpt_step != self.step:
            self._checkpoint("pause")

    def _apply_commands(self, commands: list[tuple[str, dict[str, Any]]]) -> None:
        for kind, data in commands:
            try:
                self._apply(kind, data)
            except LrvizError as exc:  # e.g. a plateau schedule without validation data
                self._event("rejected", {"kind": kind, "message": str(exc)})

    def _apply(self, kind: str, data: dict[str, Any]) -> None:
        step = self.step
        if kind == "set_lr":
            self._apply_lr(data["lr"])
        elif kind == "set_schedule":
            if data["spec"] is None:
                self.schedule = None
            else:
                if data["spec"].lower().startswith("reducelronplateau") and self._val_data is None:
                    raise ConfigError("ReduceLROnPlateau needs validation data; build_data() returns none")
                self._start_schedule(data["spec"], step)
        elif kind == "set_hyperparams":
            apply_hyperparams(self.optimizer, data.get("momentum"), data.get("weight_decay"))
        elif kind == "rollback":
            data = self._rollback(data)
        elif kind in ("range_test", "confirm_lr"):
            self._run_range_test(data, kind)
            return
        self._event(kind, dict(data), step)

    def _apply_lr(self, lr: float) -> None:
        """Use ``lr`` from the current step on; a running schedule is rescaled to continue from it."""
        step = self.step
        sched = self.schedule
        if sched is not None and not sched.rescale(step - self.schedule_start, lr):
            self.schedule = None
            sched = None
        if sched is not None:
            self.lrs = [float(x) for x in sched.lrs(step - self.schedule_start)]
        else:
            base = self.lrs[0]
            self.lrs = [lr * (x / base) if base > 0 else lr for x in self.lrs]
        self._set_group_lrs(self.lrs)

    def _start_schedule(self, spec_text: str, step: int) -> None:
        from .schedules import parse_schedule

        self.schedule = parse_schedule(spec_text).bind(self.lrs)
        self.schedule_start = step
        self.lrs = [float(x) for x in self.schedule.lrs(0)]
        self._set_group_lrs(self.lrs)

    def _set_group_lrs(self, lrs: Sequence[float]) -> None:
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    def _apply_due(self) -> None:
        pending = self._pending
        while pending and pending[0].step <= self.step:
            it = pending.pop(0)
            self._apply(it.kind, it.data)

    # ---- training ---------------------------------------------------------------------------------
    def _train(self) -> None:
        cfg = self.config
        exp = self.experiment
        model, opt = self.model, self.optimizer
        assert model is not None and opt is not None and self.buffer is not None
        device = self.device
        move = device is not None and device.type != "cpu"
        on_host = not move if self.stage_on_device is None else not self.stage_on_device
        train = self._train_data
        loss_of = self._loss_of
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        gnorm = _GradNorm(params)
        flat = None
        buf = self.buffer
        max_steps = cfg.steps
        max_epochs = cfg.epochs
        eval_every = cfg.eval_every
        has_val = self._val_data is not None
        ckpt_every = self.checkpoint_every if self._checkpoint_dir is not None else None
        guard = self.guard
        probe = self._probe
        layers = self.layer_probe
        first = True
        self._stage_init(device, on_host)
        perf = time.perf_counter
        t0 = self._t0
        model.train()
        self.state = "running"
        skip = self._resume_skip
        if self._checkpoint_dir is not None and self._last_ckpt_step != self.step:
            self._checkpoint("start")
        while max_epochs is None or self.epoch < max_epochs:
            batches = 0
            if skip is not None:  # continuing from a checkpoint: rebuild the data order of its epoch
                restore_rng(self._epoch_rng)
                it = iter(train)
                for _ in range(skip):
                    next(it)
                batches = skip
                restore_rng(self._resume_rng)
                skip = self._resume_skip = None
            else:
                if self._checkpoint_dir is not None:
                    self._epoch_rng = capture_rng()
                it = iter(train)
            while True:
                if self._attention:
                    self._batch_in_epoch = batches
                    self._attend()
                step = self.step
                if self._pending and self._pending[0].step <= step:
                    self._apply_due()
                if ckpt_every and step % ckpt_every == 0 and step != self._last_ckpt_step:
                    self._batch_in_epoch = batches
                    self._checkpoint("periodic")
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except Exception as exc:
                    raise error_from_exception(
                        exc, exp.path, f"iterating the training data (epoch {self.epoch + 1})") from exc
                sched = self.schedule
                if sched is not None:
                    lrs = sched.lrs(step - self.schedule_start)
                    for g, lr in zip(opt.param_groups, lrs):
                        g["lr"] = lr
                    self.lrs = lrs
                if move:
                    batch = to_device(batch, device)
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
                    lf = loss.item()
                    gn = math.sqrt(gn2.item())
                    buf.append(self.epoch, now, lf, gn, self.lrs)
                    if guard is not None:
                        det = guard.update(step, lf, gn)
                        if det is not None:
                            self._on_detection(det)
                    elif not math.isfinite(lf):
                        self._diverged(step, lf)
                else:
                    self._stage(step, loss, gn2, now)
                if probe is not None:
                    self._record_probe(step)
                if self._pace is not None:
                    self._wait_for_pace(now)
                if self._step_budget is not None:
                    self._count_budget()
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

    def _wait_for_pace(self, now: float) -> None:
        """Sleep until the next step is due (woken early by any command, so pause and stop stay prompt)."""
        pace = self._pace
        last = getattr(self, "_paced_at", None)
        due = now if last is None else last + 1.0 / pace
        delay = due - now
        if delay > 0:
            with self._cond:
                if not self._attention:
                    self._cond.wait(delay)
        self._paced_at = max(due, now) if delay > -0.1 else now

    def _count_budget(self) -> None:
        with self._cond:
            if self._step_budget is not None:
                self._step_budget -= 1
                if self._step_budget <= 0:
                    self._step_budget = None
                    self._pause_requested = True
                    self._attention = True

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

    # ---- device staging: no host sync per step on an accelerator ---------------------------------
    def _stage_init(self, device: torch.device | None, on_host: bool) -> None:
        self._staged = 0
        self._stage_first = self.step
        self._last_flush = 0.0
        if on_host:
            self._stage_loss = self._stage_gn = None
            return
        dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64  # no f64 on MPS
        self._stage_loss = torch.zeros(DEVICE_STAGE_STEPS, dtype=dtype, device=device)
        self._stage_gn = torch.zeros(DEVICE_STAGE_STEPS, dtype=dtype, device=device)

    def _stage(self, step: int, loss: torch.Tensor, gn2: torch.Tensor, now: float) -> None:
        j = self._staged
        buf = self.buffer
        row = buf.n + j
        cols = buf.reserve_row(row)
        cols.epoch[row] = self.epoch
        cols.time[row] = now
        cols.lr[row] = self.lrs
        self._stage_loss[j] = loss.detach()
        self._stage_gn[j] = gn2.detach()
        self._staged = j + 1
        if self._staged >= DEVICE_STAGE_STEPS or now - self._last_flush >= FLUSH_SECONDS:
            self._flush_device()

    def _flush_device(self) -> None:
        j = getattr(self, "_staged", 0)
        if not j or self._stage_loss is None:
            return
        host = torch.stack((self._stage_loss[:j], self._stage_gn[:j])).cpu().numpy()  # one transfer
        buf = self.buffer
        n = buf.n
        cols = buf.reserve_row(n + j - 1)
        cols.loss[n:n + j] = host[0]
        cols.grad_norm[n:n + j] = np.sqrt(host[1])
        self._staged = 0
        self._last_flush = time.perf_counter() - self._t0
        buf.n = n + j
        guard = self.guard
        if guard is not None:
            det = guard.update_many(buf.first_step + n, host[0], np.sqrt(host[1]))
            if det is not None:
                self._on_detection(det)
            return
        bad = np.flatnonzero(~np.isfinite(host[0]))
        if bad.size:
            self._diverged(n + int(bad[0]) + buf.first_step, float(host[0][bad[0]]))

    # ---- validation -------------------------------------------------------------------------------
    def _validate(self) -> None:
        self._flush_device()
        model = self.model
        exp = self.experiment
        device = self.device
        move = device is not None and device.type != "cpu"
        custom = callable(getattr(exp.module, "compute_loss", None))
        loss_fn = getattr(exp.module, "loss_fn", None)
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        count = 0
        classify = not custom
        model.eval()
        try:
            with torch.no_grad():
                for batch in self._val_data:
                    if self._stop_requested:
                        raise _Stop
                    if move:
                        batch = to_device(batch, device)
                    try:
                        if custom:
                            loss = exp.module.compute_loss(model, batch)
                            n = 1
                        else:
                            x, y = batch
                            out = model(x)
                            loss = loss_fn(out, y)
                            n = len(y) if isinstance(y, torch.Tensor) and y.ndim else 1
                            if classify and isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] > 1 \
                                    and isinstance(y, torch.Tensor) and y.ndim == 1 and not y.is_floating_point():
                                correct += (out.argmax(1) == y).sum()
                            else:
                                classify = False
                    except Exception as exc:
                        raise exp.describe_batch_error(exc, batch, f"validation after step {self.step - 1}") from exc
                    total += loss.detach().double() * n
                    count += n
        finally:
            model.train()
        if count == 0:
            raise ScriptError("build_data()'s validation data yielded no batches", str(exp.path),
                              exp.line_of("build_data"))
        vloss = float(total) / count
        acc = float(correct) / count if classify else None
        point = ValPoint(self.step - 1, self.epoch, vloss, acc, time.perf_counter() - self._t0)
        self.validation.append(point)
        sched = self.schedule
        if sched is not None and getattr(sched, "stateful", False) and math.isfinite(vloss):
            if sched.observe_validation(vloss):
                self.lrs = [float(x) for x in sched.lrs(self.step - self.schedule_start)]
                self._set_group_lrs(self.lrs)
                self._event("lr_reduced", {"lr": self.lrs[0], "val_loss": vloss})
        if self._early is not None and math.isfinite(vloss) and self._early.update(vloss):
            self._event("early_stop", {"patience": self.config.early_stopping, "best_val_loss": self._early.best})
            raise _EarlyStop
