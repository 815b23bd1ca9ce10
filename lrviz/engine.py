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

from . import failure
from . import interventions as iv
from .checkpoint import (
    CheckpointInfo,
    capture_generators,
    capture_rng,
    data_generators,
    restore_generators,
    restore_rng,
)
from .config import RunConfig
from .devices import resolve_device, to_device
from .errors import ConfigError, DivergedError, LrvizError, ScriptError
from .experiment import Experiment, error_from_exception
from .optim import apply_hyperparams, build_optimizer
from .records import Event, StepBuffer, ValPoint
from .states import SETTING_COMMANDS, Command

log = logging.getLogger(__name__)

TERMINAL_STATES = ("finished", "stopped", "diverged", "failed")
#: On an accelerator, losses stay on the device and are copied in one transfer per this many steps
#: (or per FLUSH_SECONDS, whichever comes first).
DEVICE_STAGE_STEPS = 256
FLUSH_SECONDS = 0.1
#: A change of settings (set LR, schedule, momentum/weight decay) at most this many steps before a
#: divergence the guard caught is taken as its cause: a roll-back restores a checkpoint from before it.
CAUSE_STEPS = 500
#: The events that change a run's settings: one of them may be what led to a divergence.
_SETTING_EVENTS = ("set_lr", "set_schedule", "set_hyperparams")


#: Where a submitted command keeps its Future in the queued data (never recorded).
_FUTURE = "_future"
#: Controls act on flags at once (see ``submit``); the queue only carries their acks.
_CONTROL_FLAGS: dict[str, dict[str, Any]] = {
    Command.PAUSE: {"_pause_requested": True},
    Command.RESUME: {"_pause_requested": False, "_step_budget": None},
    Command.STEP_ONCE: {"_pause_requested": False, "_step_budget": 1},
    Command.STOP: {"_stop_requested": True},
}
_CONTROLS = frozenset(_CONTROL_FLAGS)


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
        self._closed = False  # set once the run has ended: commands are then refused
        #: Called with the run's id once it is recorded in the store (e.g. to register its endpoint).
        self.on_open: list[Any] = []
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
        self._data_gens: dict[str, torch.Generator] = {}  # the training data's own generators
        self._epoch_data_rng: dict[str, torch.Tensor] | None = None
        self._resume_iter: tuple[Any, int] | None = None  # (iterator, batches taken) of a continued epoch
        self._start_step = 0  # the step this engine started at (a fork's or resume's checkpoint step)
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
        self._command("set_hyperparams", self._check_hyperparams({"momentum": momentum,
                                                                  "weight_decay": weight_decay}))

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
            if self._closed:
                fut.set_exception(ConfigError(f"the run has ended ({self.state})"))
                return fut
            self._commands.append((kind, {"kwargs": kwargs, "future": fut}))
            self._attention = True
            self._cond.notify_all()
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
            try:
                cmd = Command(kind)
            except ValueError:
                raise ConfigError(f"unknown command {kind!r}; known: {', '.join(c.value for c in Command)}") from None
            if cmd in SETTING_COMMANDS:
                if cmd == Command.SET_HYPERPARAMS:
                    data = self._check_hyperparams(data)
                else:
                    data = iv.check(cmd.value, data)
                    if cmd == Command.SET_SCHEDULE and data["spec"] is not None:
                        self._check_schedule_usable(data["spec"])
            elif cmd == Command.SET_PACE:
                self.set_pace(data.get("steps_per_second"))
                fut.set_result(self._ack(cmd, {"steps_per_second": self._pace}))
                return fut
            elif cmd == Command.CANCEL_RANGE_TEST:
                self.cancel_range_test()
                fut.set_result(self._ack(cmd, {}))
                return fut
            elif cmd == Command.CHECKPOINT and self._checkpoint_dir is None and self.store is None:
                raise ConfigError("this run keeps no checkpoints (it is not saved in a store)")
            elif cmd == Command.RANGE_TEST:
                return self._submit_range_test(data)
        except LrvizError as exc:
            fut.set_exception(exc)
            return fut
        flags = _CONTROL_FLAGS.get(cmd, {})
        with self._cond:
            if self._closed:
                fut.set_exception(ConfigError(f"the run has ended ({self.state})"))
                return fut
            for name, value in flags.items():
                setattr(self, name, value)
            if cmd == Command.RESUME:
                self.detection = None
            self._commands.append((cmd.value, {**data, _FUTURE: fut}))
            self._attention = True
            self._cond.notify_all()
        return fut

    def _ack(self, kind: str, data: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        return {"kind": str(kind), "step": self.step if step is None else step, "data": data}

    def _submit_range_test(self, kwargs: dict[str, Any]) -> Future:
        outer: Future = Future()
        inner = self.range_test(**kwargs)

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                outer.set_exception(exc)
            else:
                r = f.result()
                rows = {"lrs": r.lrs.tolist(), "losses": r.losses.tolist(), "smoothed": r.smoothed.tolist()}
                outer.set_result(self._ack(Command.RANGE_TEST, {"result": {**r.to_dict(), **rows}}))

        inner.add_done_callback(done)
        return outer

    def _check_hyperparams(self, data: dict[str, Any]) -> dict[str, Any]:
        data = iv.check("set_hyperparams", data)
        opt = self.optimizer
        if opt is not None:
            g = opt.param_groups[0]
            if "momentum" in data and "momentum" not in g and "betas" not in g:
                raise ConfigError(f"{type(opt).__name__} has no momentum to change")
        return data

    def _command(self, kind: str, data: dict[str, Any]) -> None:
        data = iv.check(kind, data)  # errors reach the caller, in its own thread
        if kind == "set_schedule" and data["spec"] is not None:
            self._check_schedule_usable(data["spec"])
        if kind == "rollback":
            # the trouble it answers, as seen now: resume() (the banner's "resume after roll-back")
            # clears the detection before the training thread gets to this command
            data["detection"] = self.detection
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
        """Prepare and train in the calling thread; return the final state.

        The run always ends in a true state: a KeyboardInterrupt ends it as stopped, an ``exit()`` in
        the script as failed (both re-raised afterwards when run() trains in the main thread).
        """
        self._t0 = time.perf_counter()
        # OpenMP's thread count is per thread: a new thread would use every core for each small
        # matmul and spin-wait on the others, whatever torch.set_num_threads() said in the main thread
        torch.set_num_threads(torch.get_num_threads())
        control: BaseException | None = None
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
            misread = failure.not_the_rate(self)  # e.g. an empty batch: no advice to lower the rate
            if misread is not None:
                self._fail(misread)
        except LrvizError as exc:
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
        self._data_gens = data_generators(train)
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
        """Continue from a checkpoint: weights, optimizer, schedule, RNG, step and data position.

        Everything is read and checked (the data position rebuilt too) before the store is touched,
        so a checkpoint that is refused leaves its run exactly as it was. A fork given no
        interventions of its own continues as its parent did: the parent's later interventions are
        applied at the same steps.
        """
        from . import checkpoint as ckpt

        o = self.origin
        data = ckpt.load(o.checkpoint, map_location=self.device)
        try:
            per_epoch = len(self._train_data)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        ckpt.check(data, o.checkpoint, step=o.step, groups=len(self.lrs), data_gens=self._data_gens,
                   batches_per_epoch=per_epoch)
        self._restore_training_state(data, o.checkpoint)
        for what, part, key in (("guard", self.guard, "guard"), ("early stopping", self._early, "early_stopping")):
            if part is not None and data.get(key):
                try:
                    part.load_state_dict(data[key])
                except (LrvizError, TypeError, ValueError, KeyError, AttributeError) as exc:
                    raise ConfigError(f"checkpoint {o.checkpoint} is damaged: its {what} state cannot be "
                                      f"restored ({exc})") from None
        self.step = self._start_step = self._last_ckpt_step = data["step"]
        self.epoch = data["epoch"]
        self._epoch_rng = data["epoch_rng"]
        drng = data.get("data_rng") or {}
        self._epoch_data_rng = drng.get("epoch")
        self._resume_iter = self._rebuild_position(data["batch_in_epoch"], data["rng"], drng.get("now"))
        self._time_offset = float(data.get("time", 0.0))
        origin = CheckpointInfo(Path(o.checkpoint), self.step, "origin", None)
        if o.kind == "resume" and self.store is not None:
            origin.seq = self._take_over_stored_run(o)
        else:
            self.buffer = StepBuffer(groups=len(self.lrs), capacity=4096, first_step=self.step)
            if o.kind == "fork" and self.store is not None and not self._pending:
                self._pending = self._parent_interventions(o)
        self.checkpoints.append(origin)

    def _rebuild_position(self, batches: int, rng: dict[str, Any],
                          data_now: dict[str, torch.Tensor] | None) -> tuple[Any, int]:
        """The iterator of the checkpoint's epoch, ``batches`` batches in, with every RNG as it was then."""
        restore_rng(self._epoch_rng)
        restore_generators(self._data_gens, self._epoch_data_rng)
        exp = self.experiment
        during = f"iterating the training data (epoch {self.epoch + 1})"
        try:
            it = iter(self._train_data)
            for i in range(batches):
                try:
                    next(it)
                except StopIteration:
                    raise ConfigError(
                        f"checkpoint {self.origin.checkpoint} continues at batch {batches} of epoch "
                        f"{self.epoch + 1}, but the training data now has {i} batches an epoch "
                        "(did build_data change?)") from None
        except LrvizError:
            raise
        except Exception as exc:
            raise error_from_exception(exc, exp.path, during) from exc
        restore_rng(rng)
        restore_generators(self._data_gens, data_now)
        return it, batches

    @staticmethod
    def _checkpoint_event_index(events: list[Event], origin: Origin) -> int | None:
        """The index of the event of ``origin``'s checkpoint in a stored run's events."""
        name = Path(origin.checkpoint).name
        for i, e in enumerate(events):
            if e.kind == "checkpoint" and e.step == origin.step and Path(str(e.data.get("path", ""))).name == name:
                return i
        return None

    def _take_over_stored_run(self, o: Origin) -> int:
        """Resume: keep what the run recorded up to its checkpoint (that checkpoint's event too) and
        forget the rest. Returns the index of the checkpoint's event."""
        store = self.store
        k = self.step
        steps = store.load_steps(o.run_id, 0, k)
        buffer = StepBuffer.from_columns(steps)
        if len(buffer) != k:
            raise ConfigError(f"run {o.run_id} has {len(buffer)} stored steps, fewer than its checkpoint's "
                              f"step {k}; resume it from an earlier checkpoint (or fork it)")
        if len(buffer) and buffer.groups != len(self.lrs):
            raise ConfigError("the stored run has another number of param groups than the script now builds")
        events = store.load_events(o.run_id)
        at = self._checkpoint_event_index(events, o)
        if at is None:  # no event names the file: keep what came before its step
            at = sum(1 for e in events if e.step < k) - 1
        kept = events[:at + 1]
        validation = [p for p in store.load_validation(o.run_id) if p.step < k]
        with store.batch():
            store.truncate_run(o.run_id, k)
            store.add_events(o.run_id, [e for e in kept if e.step >= k])
        self.buffer = buffer
        # in place: the app took these lists when it showed the run, before it started
        self.events.extend(kept)
        self.validation.extend(validation)
        self._writer_start = (len(buffer), len(kept), len(validation))
        return at

    def _parent_interventions(self, o: Origin) -> list[iv.Intervention]:
        """The interventions the parent applied after the checkpoint a fork starts from."""
        events = self.store.load_events(o.run_id)
        at = self._checkpoint_event_index(events, o)
        later = events[at + 1:] if at is not None else [e for e in events if e.step > o.step]
        return [x for x in iv.from_events(later) if x.step >= o.step]

    def _restore_training_state(self, data: dict[str, Any], path: str | Path) -> None:
        """Model, optimizer, LRs and schedule from a checkpoint (not RNG, step or data position)."""
        from .schedules import Schedule

        try:
            self.model.load_state_dict(data["model"])
            self.optimizer.load_state_dict(data["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"checkpoint {path} does not fit this script's model or optimizer: {exc}") from None
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
        for callback in self.on_open:
            callback(self.run_id)

    # ---- checkpoints, roll-back, the guard ---------------------------------------------------------
    def _checkpoint(self, reason: str) -> Any:
        """Save everything needed to continue exactly from the current step; record an event."""
        from . import checkpoint as ckpt

        self._flush_device()
        if self._epoch_rng is None:
            self._epoch_rng = capture_rng()
            self._epoch_data_rng = capture_generators(self._data_gens)
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
            "data_rng": {"epoch": self._epoch_data_rng or {}, "now": capture_generators(self._data_gens)},
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "early_stopping": self._early.state_dict() if self._early is not None else None,
        }
        path = self._checkpoint_dir / f"step-{self.step:09d}-{reason}.pt"
        ckpt.save(path, payload)
        info = ckpt.CheckpointInfo(path, self.step, reason, loss, seq=len(self.events))
        self.checkpoints.append(info)
        self._last_ckpt_step = self.step
        self._event("checkpoint", {"path": str(path), "reason": reason,
                                   "loss": loss if loss is not None and math.isfinite(loss) else None})
        keep = self._rollback_targets()
        periodic = [c for c in self.checkpoints if c.reason == "periodic" and c.seq not in keep]
        for old in periodic[:-self.keep_checkpoints] if self.keep_checkpoints else []:
            try:
                old.path.unlink()
            except OSError:
                pass
            self.checkpoints.remove(old)
        return info

    def _rollback_targets(self) -> set[int]:
        """The ``seq`` of each latest checkpoint before a change of settings of the last CAUSE_STEPS
        steps: what a roll-back restores if that change leads to a divergence (kept from pruning)."""
        changes = []
        for i in range(len(self.events) - 1, -1, -1):
            e = self.events[i]
            if e.step < self.step - CAUSE_STEPS:
                break
            if e.kind in _SETTING_EVENTS:
                changes.append(i)
        out = set()
        for i in changes:
            before = [c.seq for c in self.checkpoints if c.seq < i]
            if before:
                out.add(before[-1])
        return out

    def _good_checkpoint(self, det: Any = None) -> CheckpointInfo:
        """The latest checkpoint from before the trouble the guard saw in ``det`` (or before now).

        Before the trouble means: saved before the guard's detection window, and before the change
        of settings that led to it (the latest one within CAUSE_STEPS steps before the detection, since
        the last roll-back). A checkpoint saved at or after the detection is never chosen.
        """
        usable = [c for c in self.checkpoints if c.path.exists() and (c.loss is None or math.isfinite(c.loss))]
        if det is None:
            if usable:
                return usable[-1]
            raise ConfigError("there is no checkpoint to roll back to (checkpoints are kept only for runs "
                              "saved in a store)")
        margin = getattr(getattr(self.guard, "config", None), "oscillation_window", 20)
        limit = max(det.step - margin, self._start_step)
        cause = self._cause_of(det)
        before = [c for c in usable if c.step <= limit and (cause is None or c.seq < cause)]
        if before:
            return before[-1]
        what = f"the change at step {self.events[cause].step} that led to it" if cause is not None else \
            f"step {limit}"
        raise ConfigError(f"there is no checkpoint from before the trouble at step {det.step} (before {what}) "
                          "to roll back to; save checkpoints more often (--checkpoint-every N)")

    def _cause_of(self, det: Any) -> int | None:
        """The index in ``events`` of the change of settings that led to ``det``, if one did."""
        events = self.events
        oldest = det.step - CAUSE_STEPS
        for i in range(len(events) - 1, -1, -1):
            e = events[i]
            if e.kind == "rollback" or e.step < oldest:
                break
            if e.kind in _SETTING_EVENTS and e.step <= det.step:
                return i
        return None

    def _rollback(self, data: dict[str, Any]) -> dict[str, Any]:
        from . import checkpoint as ckpt

        det = data.get("detection", self.detection)
        if data.get("path"):
            path = Path(data["path"])
            info = next((c for c in self.checkpoints if c.path == path), None)
        else:
            info = self._good_checkpoint(det)
            path = info.path
        saved = ckpt.load(path, map_location=self.device)
        ckpt.check(saved, path, groups=len(self.lrs))
        self._flush_device()
        self._restore_training_state(saved, path)
        factor = float(data["lr_factor"])
        new_lr = self.lrs[0] * factor
        self._apply_lr(new_lr)
        if self.guard is not None:
            self.guard.reset()
        self.detection = None
        if info is not None:  # checkpoints saved after it belong to the abandoned course
            self.checkpoints = [c for c in self.checkpoints if c.seq <= info.seq]
        out = {"lr_factor": factor, "path": str(path), "to_step": int(saved["step"]), "lr": new_lr}
        if data.get("auto"):
            out["auto"] = True
        return out

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
        self.probe_steps.append(step)
        for k, v in numbers:
            self.probe_values.setdefault(k, []).append(v)

    def _run_range_test(self, data: dict[str, Any], kind: str = "range_test") -> None:
        from .rangetest import confirm_rates, range_test

        fut: Future = data["future"]
        if not fut.set_running_or_notify_cancel():
            return
        self._range_cancel = False
        common = {"device": self.device, "should_stop": lambda: self._stop_requested or self._range_cancel}
        data_order = capture_generators(self._data_gens)  # the test draws batches; training must not notice
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

    def _finish(self) -> None:
        self._close_commands()
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
            fut: Future | None = data.pop(_FUTURE, None)
            if kind in _CONTROLS:  # already acted on; the ack names the step it came before
                if fut is not None:
                    fut.set_result(self._ack(kind, {}))
                continue
            try:
                applied = self._apply(kind, data)
            except LrvizError as exc:  # e.g. a plateau schedule without validation data
                self._event("rejected", {"kind": kind, "message": str(exc)})
                if fut is not None:
                    fut.set_exception(exc)
                continue
            if fut is not None:
                fut.set_result(self._ack(kind, applied or {}))

    def _close_commands(self) -> None:
        """Answer the commands the run ended before applying (a stop is then done; the rest are not)."""
        with self._cond:
            self._closed = True
            left = list(self._commands)
            self._commands.clear()
        for kind, data in left:
            fut = data.get(_FUTURE) or data.get("future")
            if fut is None or fut.done():
                continue
            if kind == Command.STOP:
                fut.set_result(self._ack(kind, {}))
            else:
                fut.set_exception(ConfigError(f"the run ended ({self.state}) before {kind} took effect"))

    def _apply(self, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        """Apply an intervention now (before step ``self.step``); return what was recorded."""
        step = self.step
        if kind == "checkpoint":
            if self._checkpoint_dir is None:
                raise ConfigError("this run keeps no checkpoints (it is not saved in a store)")
            info = self._checkpoint("manual")
            return {"path": str(info.path), "checkpoint_step": info.step}
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
            return None
        self._event(kind, dict(data), step)
        return dict(data)

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
        if self._checkpoint_dir is not None and self._last_ckpt_step != self.step:
            self._checkpoint("start")
        while max_epochs is None or self.epoch < max_epochs:
            if self._resume_iter is not None:  # continuing a checkpoint's epoch (rebuilt by _load_origin)
                it, batches = self._resume_iter
                self._resume_iter = None
            else:
                batches = 0
                if self._checkpoint_dir is not None:
                    self._epoch_rng = capture_rng()
                    self._epoch_data_rng = capture_generators(self._data_gens)
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
