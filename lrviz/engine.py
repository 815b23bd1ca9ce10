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
from typing import Any

import numpy as np
import torch

from . import interventions as iv
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
    ):
        self.experiment = experiment
        self.config = config.validated()
        self.store = store
        self.name = name
        self.stop_on_divergence = stop_on_divergence
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
        """Resume a paused run."""
        self._signal(_pause_requested=False, _step_budget=None)

    def step_once(self) -> None:
        """Run exactly one step, then pause."""
        self._signal(_pause_requested=False, _step_budget=1)

    def stop(self) -> None:
        """Stop at the next step boundary (or between validation batches)."""
        self._signal(_stop_requested=True)

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
            if self._stop_requested:
                raise _Stop
            self._train()
            self.state = "finished"
        except _Stop:
            self.state = "stopped"
            self._event("stop", {})
        except DivergedError as exc:
            self.state = "diverged"
            self.error = exc
        except LrvizError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug in the user's code we could not place, or ours
            err = error_from_exception(exc, self.experiment.path, "training")
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

    def _open_run(self) -> None:
        if self.store is None:
            return
        from .writer import StoreWriter

        exp = self.experiment
        self.run_id = self.store.create_run(
            script_path=str(exp.path), script_hash=exp.source_hash, config=self.config.to_dict(),
            device=str(self.device), name=self.name, **self._run_origin(),
        )
        self.store.set_status(self.run_id, "running")
        self._writer = StoreWriter(self.store, self.run_id, self)
        self._writer.start()

    def _run_origin(self) -> dict[str, Any]:
        return {}

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
        if self.error is not None:
            out["error"] = str(self.error)
        return out

    # ---- between steps ----------------------------------------------------------------------------
    def _event(self, kind: str, data: dict[str, Any], step: int | None = None) -> Event:
        e = Event(self.step if step is None else step, kind, data, time.perf_counter() - self._t0)
        self.events.append(e)
        return e

    def _attend(self) -> None:
        """Apply queued commands; wait while paused; raise _Stop on stop."""
        with self._cond:
            self._attention = False
            self._apply_commands()
            if self._stop_requested:
                raise _Stop
            if self._pause_requested:
                self._flush_device()
                self.state = "paused"
                self._event("pause", {})
                self._on_pause()
                while self._pause_requested and not self._stop_requested:
                    self._cond.wait()
                    self._apply_commands()
                self._attention = False
                if self._stop_requested:
                    raise _Stop
                self.state = "running"
                self._event("resume", {})

    def _on_pause(self) -> None:
        """Hook for checkpoints at pause (used by the lab)."""

    def _apply_commands(self) -> None:
        while self._commands:
            kind, data = self._commands.popleft()
            try:
                self._apply(kind, data)
            except LrvizError as exc:  # e.g. a plateau schedule without validation data
                self._event("rejected", {"kind": kind, "message": str(exc)})

    def _apply(self, kind: str, data: dict[str, Any]) -> None:
        step = self.step
        if kind == "set_lr":
            lr = data["lr"]
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
        elif kind == "set_schedule":
            if data["spec"] is None:
                self.schedule = None
            else:
                if data["spec"].lower().startswith("reducelronplateau") and self._val_data is None:
                    raise ConfigError("ReduceLROnPlateau needs validation data; build_data() returns none")
                self._start_schedule(data["spec"], step)
        elif kind == "set_hyperparams":
            apply_hyperparams(self.optimizer, data.get("momentum"), data.get("weight_decay"))
        self._event(kind, dict(data), step)

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
        on_host = not move
        train = self._train_data
        loss_of = self._loss_of
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        gnorm = _GradNorm(params)
        buf = self.buffer
        max_steps = cfg.steps
        max_epochs = cfg.epochs
        eval_every = cfg.eval_every
        has_val = self._val_data is not None
        first = True
        self._stage_init(device, on_host)
        perf = time.perf_counter
        t0 = self._t0
        model.train()
        self.state = "running"
        if self._pending and self._pending[0].step <= self.step:
            self._apply_due()
        next_due = self._pending[0].step if self._pending else -1
        while max_epochs is None or self.epoch < max_epochs:
            batches = 0
            it = iter(train)
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except Exception as exc:
                    raise error_from_exception(exc, exp.path, f"iterating the training data (epoch {self.epoch + 1})") from exc
                if self._attention:
                    self._attend()
                step = self.step
                if step == next_due:
                    self._apply_due()
                    next_due = self._pending[0].step if self._pending else -1
                sched = self.schedule
                if sched is not None:
                    lrs = sched.lrs(step - self.schedule_start)
                    for g, lr in zip(opt.param_groups, lrs):
                        g["lr"] = lr
                    self.lrs = lrs
                if move:
                    batch = to_device(batch, device)
                try:
                    gnorm.zero(opt)
                    loss = loss_of(model, batch)
                    if first:
                        self._check_loss(loss)
                    loss.backward()
                    gn2 = gnorm.squared()
                    opt.step()
                except LrvizError:
                    raise
                except Exception as exc:
                    raise exp.describe_batch_error(exc, batch, f"training step {step} (epoch {self.epoch + 1})") from exc
                first = False
                batches += 1
                now = perf() - t0
                if on_host:
                    lf = loss.item()
                    buf.append(self.epoch, now, lf, math.sqrt(gn2.item()), self.lrs)
                    if not math.isfinite(lf):
                        self.step = step + 1
                        self._diverged(step, lf)
                else:
                    self._stage(step, loss, gn2, now)
                self.step = step + 1
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
                raise ScriptError(f"build_data()'s training data yielded no batches {what}", str(exp.path))
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
        fn = "compute_loss()" if callable(getattr(exp.module, "compute_loss", None)) else "loss_fn()"
        if not isinstance(loss, torch.Tensor):
            raise ScriptError(f"{fn} returned {type(loss).__name__}; it must return a scalar torch.Tensor",
                              str(exp.path))
        if loss.numel() != 1:
            raise ScriptError(f"{fn} returned a tensor of shape {list(loss.shape)}; it must return a scalar "
                              "(reduce it with .mean())", str(exp.path))
        if not loss.requires_grad:
            raise ScriptError(f"{fn} returned a tensor that does not require grad; compute it from the model's "
                              "output without .detach() or torch.no_grad()", str(exp.path))

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
        self._stage_loss = torch.zeros(DEVICE_STAGE_STEPS, dtype=torch.float64, device=device)
        self._stage_gn = torch.zeros(DEVICE_STAGE_STEPS, dtype=torch.float64, device=device)

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
            raise ScriptError("build_data()'s validation data yielded no batches", str(exp.path))
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
