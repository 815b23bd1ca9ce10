"""``lrviz.track``: record and steer a training loop you already have, in two lines.

::

    import lrviz
    with lrviz.track(optimizer, model=model, name="resnet lr 0.1") as run:
        for batch in loader:
            loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
            run.step(loss)            # records the loss and the LR each group used; applies steering
            if run.should_stop:
                break
        run.log(val_loss=v)           # validation (val_loss, val_accuracy) or any other scalar

One stored run per ``track``, live while it trains: the app's run browser shows it (Watch), and
``lrviz steer RUN --lr 0.01`` changes its rate at the next step. A pre-step hook on the optimizer
reads the rates each group really used (and, once lrviz has set the rate or a schedule, writes
lrviz's rates just before each step, so a torch scheduler of the loop no longer moves them: the
override is recorded as an event). On a GPU the losses stay on the device and are copied once per
flush (no host sync per step). An error inside lrviz never stops the training: it is printed once,
the run is marked, and ``step`` becomes a no-op.

Why ~630 lines in one module: :class:`TrackedRun` is one object that a user's loop calls per step; its
fast path, its steering and its recovery from its own errors read the same state. The recording and the
store are :class:`lrviz.recorder.RunRecorder`'s, the commands' queue :class:`lrviz.control.RunControl`'s.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import interventions as iv
from .control import RunControl, Steering, Stopped, ack
from .distributed import rank_of_process
from .errors import ConfigError, LrvizError
from .optim import apply_hyperparams
from .rates import RateControl
from .recorder import Recorded, RunRecorder
from .records import StepBuffer, ValPoint
from .staging import Staging
from .states import SETTING_COMMANDS, Command, RunState, parse_command

__all__ = ["StopTraining", "TrackedRun", "track"]

log = logging.getLogger(__name__)

_DEFAULT = object()
_INF = math.inf
_NAN = math.nan
_perf = time.perf_counter


class StopTraining(Exception):
    """Raised by ``run.step`` when the run was asked to stop and ``track(..., on_stop="raise")``."""


def track(optimizer: Any, *, model: Any = None, name: str | None = None, store: Any = _DEFAULT,
          listen: str | None | bool = _DEFAULT, config: dict[str, Any] | None = None, steps: int | None = None,
          grad_norm: bool = False, on_stop: str = "flag", quiet: bool = False, first_step: int = 0,
          read_only: str | None = None) -> TrackedRun:
    """Record (and serve, to steer it live) the training loop that steps ``optimizer``.

    ``optimizer``: a ``torch.optim.Optimizer``, or a list of them stepped by the same loop (a GAN's
    two): their param groups are recorded in order, one LR series each.

    ``store``: a :class:`lrviz.store.runs.RunStore`, a path, or None for no store (default: the default
    store, as ``lrviz run`` uses). ``listen``: ``HOST:PORT`` to serve over TCP as well, False for no
    endpoint (default: a local socket when there is a store). ``config``: settings to keep with the
    run. ``steps``: the planned number of steps (for progress). ``grad_norm``: also record the
    gradient norm (costs a norm over every gradient per step). ``on_stop``: ``"flag"`` sets
    ``should_stop`` when the run is stopped from outside; ``"raise"`` raises :class:`StopTraining`.
    ``first_step``: the number of the first step recorded (a trainer resumed from a checkpoint at
    its global step). ``read_only``: watch only; every command is refused with this reason.
    """
    return TrackedRun(optimizer, model=model, name=name, store=store, listen=listen, config=config, steps=steps,
                      grad_norm=grad_norm, on_stop=on_stop, quiet=quiet, first_step=first_step,
                      read_only=read_only).start()


class TrackedRun(Steering, Recorded):
    """One tracked run (see :func:`track`). Use it as a context manager, or call :meth:`finish`."""

    def __init__(self, optimizer: Any, *, model: Any = None, name: str | None = None, store: Any = _DEFAULT,
                 listen: str | None | bool = _DEFAULT, config: dict[str, Any] | None = None,
                 steps: int | None = None, grad_norm: bool = False, on_stop: str = "flag", quiet: bool = False,
                 first_step: int = 0, read_only: str | None = None):
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        bad = [o for o in optimizers if not isinstance(o, torch.optim.Optimizer)]
        if bad or not optimizers:
            what = type(bad[0]).__name__ if bad else "an empty list"
            raise ConfigError(f"lrviz.track needs a torch.optim.Optimizer (or a list of them), not {what} "
                              "(pass the optimizer your loop steps)")
        if len(optimizers) > 1:
            optimizer = Optimizers(optimizers)
        if int(first_step) < 0:
            raise ConfigError(f"first_step must be 0 or more, not {first_step!r}")
        if on_stop not in ("flag", "raise"):
            raise ConfigError(f"on_stop must be 'flag' or 'raise', not {on_stop!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model= must be a torch.nn.Module, not {type(model).__name__}")
        self.optimizer = optimizer
        self.model = model
        self.name = name
        self.quiet = quiet
        self.on_stop = on_stop
        self.total_steps = steps
        self.settings = dict(config or {})
        follower = rank_of_process() > 0  # under a process group, rank 0 records and serves
        self.store = None if follower else _open_store(store)
        self._own_store = self.store is not None and not hasattr(store, "create_run")
        self.listen = False if follower else listen
        #: This rank's place in the process group the loop initialized (made by start()), or None.
        self.dist: Any = None
        #: At the end of a run under a process group: whether every rank's parameters are identical.
        self.ranks_in_sync: bool | None = None
        self.rec = RunRecorder(self.store)
        self.control = RunControl()
        self.rates = RateControl(optimizer)
        self.overridden = False  # lrviz set the rate or a schedule: it holds from then on
        self.optimizers = optimizers
        self.read_only = read_only
        self.first_step = int(first_step)
        self.step_index = self.first_step
        self.epoch = 0
        self.error: str | None = None
        self.error_detail = ""
        self.detection = None
        self.layer_probe = None
        self.done = threading.Event()
        self.should_stop = False
        self.script_path = _main_script()
        self._grad_norm = grad_norm
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._missing: list[int] = []  # steps staged on the device without a loss (not checked at flush)
        self._last_missing = -1  # the last step recorded without a loss
        self._used: list[float] | None = None
        self._gn2: torch.Tensor | None = None
        self._staging: Staging | None = None
        self._endpoint: Any = None
        self._hooks: list[Any] = []
        self._off = False
        self._finished = False
        self._fast = False  # step() may take its short path (set by start, cleared by finish/_broken)
        self._appends: tuple[Any, ...] = ()  # the staging's per-column appends (the short path)
        self._times: Any = ()  # its time column of rows not yet written (their count)
        self._warned: set[str] = set()

    @property
    def steps_done(self) -> int:
        """The index of the next step (the number of steps recorded, plus ``first_step``)."""
        return self.step_index

    @property
    def lrs(self) -> list[float]:
        """Each group's rate now: lrviz's once it set the rate or a schedule, else whatever the loop (or its
        own scheduler) left in the optimizer. Read by clients, never per step."""
        if not self.overridden:
            try:
                return [float(g["lr"]) for g in self.optimizer.param_groups]
            except (TypeError, ValueError, KeyError):  # an lr that is not a number: what lrviz last knew
                pass
        return self.rates.lrs

    @property
    def device(self) -> str | None:
        return str(self._params[0].device) if self._params else None

    def describe_live(self) -> dict[str, Any]:
        return {"kind": "tracked", "pid": os.getpid(), "run_id": self.run_id, "name": self.name or "",
                "script_path": self.script_path, "script_name": Path(self.script_path).stem,
                "config": self._config(), "has_surface": False}

    def summary(self) -> dict[str, Any]:
        out = self.rec.summary(self.step_index)
        if self._last_missing == self.step_index - 1 and "final_loss" in out:  # the last steps were not measured: the last that was
            loss = self.rec.buffer.view()["loss"]
            finite = loss[np.isfinite(loss)]
            out["final_loss"] = float(finite[-1]) if finite.size else None
        if self.error:
            out["error"] = self.error
        if self.ranks_in_sync is not None:
            out["ranks_in_sync"] = self.ranks_in_sync
        return out

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> TrackedRun:
        groups = len(self.optimizer.param_groups)
        self.rec.buffer = StepBuffer(groups=groups, capacity=4096, first_step=self.first_step)
        dev = self._params[0].device if self._params else torch.device("cpu")
        if self._across_ranks():
            self._join_ranks(dev)
        else:
            self._staging = Staging(self.rec.buffer, dev, on_host=dev.type == "cpu")
        if self._staging.on_host:
            self._appends, self._times = self._staging.appends, self._staging.host[1]
        self._fast = self._staging.on_host and not self._grad_norm
        self._hooks = [o.register_step_pre_hook(self._before_optimizer_step) for o in self.optimizers]
        self.rec.state = RunState.RUNNING
        self.rec.t0 = time.perf_counter()
        if self.store is not None:
            self.rec.open(script_path=self.script_path, script_hash=_hash_of(self.script_path),
                          config=self._config(), device=self.device or "cpu", name=self.name, kind="tracked")
        if self.listen is not False and (self.store is not None or isinstance(self.listen, str)):
            self._serve()
        if self.store is None and self._endpoint is None and self._staging.on_host:
            self._staging.quiet()  # nobody reads the rows before the end: rarer, larger blocks
        return self

    def _across_ranks(self) -> bool:
        """Whether this run spans the ranks of a process group (every rank tracks; rank 0 records). A
        loop that tracks on one rank only is recorded there alone, watch-only, after a warning."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or self.read_only:
            return False
        from .distributed import every_rank_tracks

        if every_rank_tracks():
            return True
        self.read_only = ("only this rank of the process group called lrviz.track, and steering one rank alone "
                          "would train different weights: call lrviz.track on every rank to steer")
        print(f"lrviz: warning: {self.read_only} (recording this rank, watch-only)", file=sys.stderr)
        return False

    def _join_ranks(self, device: torch.device) -> None:
        """Under a process group: rows and commands are exchanged among the ranks at agreed steps (see
        :mod:`lrviz.distributed`); rank 0 records and serves, the other ranks follow it."""
        from .distributed import Distributed, FollowerControl

        self.dist = dist = Distributed.attach(device)
        if not dist.is_main:
            self.control = FollowerControl()
        self._staging = dist.staging(self.rec.buffer, device, self.control, check=lambda *rows: self._check(rows))
        if dist.is_main:
            dist.watch(self._on_fault)

    def _on_fault(self, fault: dict[str, Any]) -> None:
        """Another rank failed (rank 0, in the watcher's thread): the run ends failed with its message;
        that rank waits for this before it exits."""
        from .distributed import remote_error

        if not self._finished:
            self.error = str(remote_error(fault))
            self.finish(RunState.FAILED)
        self.dist.mark_recorded()

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, StopTraining):
            self.finish()
            return isinstance(exc, StopTraining)  # a stop asked from outside ends the block quietly
        if isinstance(exc, KeyboardInterrupt):
            self.finish(RunState.STOPPED)
        else:
            self.error = f"the training loop raised {type(exc).__name__}: {exc}"
            self.error_detail = "".join(traceback.format_exception(exc_type, exc, tb))
            if self.dist is not None:  # another rank's message when it caused this; else ours, told to the others
                err = LrvizError(self.error)
                err.__cause__ = exc
                self.error = str(self.dist.failed(err))
            self.finish(RunState.FAILED)
        return False

    def finish(self, state: str | None = None) -> None:
        """End the run (finished, or stopped when it was stopped from outside); save everything."""
        if self._finished:
            return
        self._finished = True
        self._fast = False
        for hook in self._hooks:
            hook.remove()
        final = state or (RunState.STOPPED if self.should_stop else RunState.FINISHED)
        dist = self.dist
        try:
            if dist is not None and final == RunState.FAILED:
                self._staging.publish(self.rec.clock())  # waits on no other rank
            else:
                self._flush()
            if dist is not None and final != RunState.FAILED and not dist.closed:
                self.ranks_in_sync = dist.in_sync(self._params)
            self.rec.state = final
            if final == RunState.STOPPED:
                self.rec.event("stop", {}, self.step_index)
            elif final == RunState.FAILED and self.error:
                self.rec.event("error", {"message": self.error}, self.step_index)
            self.control.close(str(final), self.step_index)
            self.rec.close(self.summary(), self.error)
        except Exception as exc:  # noqa: BLE001 - never turn the end of the user's training into a crash
            self._broken(exc)
        finally:
            self.done.set()
            if self._endpoint is not None:
                self._endpoint.close()
            if self._own_store:
                self.store.close()
            if dist is not None:
                self._leave_ranks(final)

    def _leave_ranks(self, final: str) -> None:
        dist = self.dist
        if dist.is_main:
            dist.mark_recorded()
        elif final == RunState.FAILED:
            dist.wait_recorded()  # rank 0 records this rank's message before torchrun stops the job
        if threading.current_thread() is threading.main_thread() or final != RunState.FAILED:
            dist.close()

    # ---- in the loop -----------------------------------------------------------------------------------
    def step(self, loss: Any) -> None:
        """Record one step (its loss, and the LR each group used); apply steering; block while paused.

        ``loss`` None: a step whose loss was not measured (a trainer that logs every n steps),
        recorded as NaN without a warning.
        """
        if self._fast:  # the common case, kept to a few calls: a CPU loss, no gradient norm
            try:
                lf = loss.item()
                if -_INF < lf < _INF:
                    used = self._used
                    self._used = None
                    now = _perf() - self.rec.t0
                    add_epoch, add_time, add_loss, add_gn, add_lrs = self._appends
                    add_epoch(self.epoch)
                    add_time(now)
                    add_loss(lf)
                    add_gn(_NAN)
                    add_lrs(used if used is not None else self.rates.lrs)
                    st = self._staging
                    if len(self._times) >= st.block_rows or now - st.last_flush >= st.block_seconds:
                        st.flush(now)
                    self.step_index += 1
                    if self.control.attention:
                        self._attend()
                    return
            except Stopped:
                self._stopped()
                return
            except Exception:  # noqa: BLE001 - not a plain scalar tensor: the careful path says why
                pass
        self._step_slow(loss)

    def _step_slow(self, loss: Any) -> None:
        if self._off or self._finished:
            if self._finished:
                self._warn_once("finished", "lrviz: run.step() after the run finished is ignored")
            return
        try:
            step = self.step_index
            now = _perf() - self.rec.t0
            lrs = self._used if self._used is not None else self.rates.lrs
            self._used = None
            gn2 = self._gn2
            self._gn2 = None
            missing = loss is None
            if missing:
                loss = torch.tensor(_NAN, dtype=torch.float64)
            elif not isinstance(loss, torch.Tensor):
                loss = torch.tensor(float(loss), dtype=torch.float64)
            elif loss.numel() != 1:
                raise ConfigError(f"run.step() takes the batch's loss, a scalar; got a tensor of shape "
                                  f"{list(loss.shape)}")
            staging = self._staging
            if staging.on_host:
                lf, _ = staging.record_host(self.epoch, now, loss, gn2, lrs)
                if not missing and not math.isfinite(lf):
                    self._nonfinite(step, lf)
            else:
                if missing:
                    self._missing.append(step)
                flushed = staging.stage(self.epoch, now, loss, gn2, lrs)
                if flushed is not None:
                    self._check(flushed)
            if missing:
                self._last_missing = step
            self.step_index = step + 1
            if self.control.attention:
                self._attend()
        except Stopped:
            self._stopped()
        except ConfigError as exc:
            self._warn_once("input", f"lrviz: {exc}")
        except Exception as exc:  # noqa: BLE001 - lrviz must never break the user's training
            self._broken(exc)

    def _attend(self) -> None:
        control = self.control if self.dist is None else self._staging  # across ranks: at agreed steps
        control.attend(self._apply, lambda: self.step_index, on_pause=self._on_pause,
                       on_resume=self._on_resume, on_reject=self._on_reject)

    def _stopped(self) -> None:
        self.should_stop = True
        if self.on_stop == "raise":
            raise StopTraining(f"run {self.run_id} was stopped from outside at step {self.step_index}")

    def log(self, step: int | None = None, **scalars: Any) -> None:
        """Record ``val_loss`` / ``val_accuracy`` as a validation point, at the last step done (or ``step``)."""
        if self._off:
            return
        try:
            at = (self.step_index - 1) if step is None else int(step)
            if "val_loss" in scalars:
                acc = scalars.get("val_accuracy")
                if self.dist is None:  # under a process group, the rows come at the next agreed step
                    self._flush()
                self.rec.validation.append(ValPoint(at, self.epoch, float(scalars["val_loss"]),
                                                    None if acc is None else float(acc), self.rec.clock()))
                if self.rates.observe_validation(float(scalars["val_loss"]), self.step_index):
                    self.rec.event("lr_reduced", {"lr": self.rates.lrs[0], "val_loss": float(scalars["val_loss"])},
                                   self.step_index)
            other = {k: v for k, v in scalars.items() if k not in ("val_loss", "val_accuracy")}
            for k, v in other.items():
                self.rec.add_scalar(k, at, float(v))
        except Exception as exc:  # noqa: BLE001
            self._broken(exc)

    def hold_rates(self) -> None:
        """Once lrviz holds the rate: write it into the param groups now (after a trainer's own
        scheduler stepped), so that they show what the next step will use to anything that reads
        them in between (a checkpoint, a logger). The next step gets lrviz's rate either way."""
        if self.overridden and not self._off:
            try:
                self.rates.write(self.rates.at_step(self.step_index))
            except Exception as exc:  # noqa: BLE001
                self._broken(exc)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next steps belong to (recorded with each step)."""
        self.epoch = int(epoch)

    # ---- steering, from any thread -----------------------------------------------------------------------
    def submit(self, kind: str, data: dict[str, Any] | None = None) -> Future:
        """Ask for a command (see :meth:`lrviz.engine.TrainingEngine.submit`); applied at the next ``step``."""
        fut: Future = Future()
        data = dict(data or {})
        try:
            cmd = parse_command(kind)
            if self.read_only is not None:
                raise ConfigError(f"this run can be watched, not steered: {self.read_only}")
            if cmd in (Command.RANGE_TEST, Command.CONFIRM_LR, Command.CANCEL_RANGE_TEST, Command.ROLLBACK,
                       Command.CHECKPOINT, Command.SET_CLIP):
                raise ConfigError(f"{cmd.value} needs lrviz's own runner (`lrviz run`); a tracked loop "
                                  "can be paused, stopped and have its rate, schedule, momentum and weight decay set")
            if cmd == Command.SET_PACE:
                pace = self.control.set_pace(data.get("steps_per_second"))
                fut.set_result(ack(cmd, self.step_index, {"steps_per_second": pace}))
                return fut
            if cmd in SETTING_COMMANDS:
                data = iv.check(cmd.value, data)
                if cmd == Command.SET_SCHEDULE and self.dist is not None and data["spec"] is not None:
                    from .schedules import parse_schedule

                    if parse_schedule(data["spec"]).stateful:
                        raise ConfigError("ReduceLROnPlateau is not available in a tracked loop across ranks: "
                                          "each rank would need the same validation loss at the same step")
                if cmd == Command.SET_HYPERPARAMS:
                    g = self.optimizer.param_groups[0]
                    if "momentum" in data and "momentum" not in g and "betas" not in g:
                        raise ConfigError(f"{type(self.optimizer).__name__} has no momentum to change")
        except LrvizError as exc:
            fut.set_exception(exc)
            return fut
        return self.control.enqueue(cmd.value, data, fut, state=lambda: str(self.state))

    def command(self, kind: str, **data: Any) -> Future:
        """Ask for ``kind`` with ``data`` as keywords (the :class:`~lrviz.control.Steering` methods use this)."""
        return self.submit(kind, data)

    # ---- internals -----------------------------------------------------------------------------------
    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Just before each optimizer.step(): lrviz's rates when it holds them; note what is used."""
        if not (self.control.attention or self.overridden or self._grad_norm):
            try:  # floats, so that recording them cannot fail half-way through a row
                self._used = [float(g["lr"]) for g in self.optimizer.param_groups]
            except (TypeError, ValueError, RuntimeError):  # not a number: recorded as lrviz's own rates
                self._used = None
            return
        try:
            if self.control.attention and self.dist is None:  # a new rate/schedule/momentum: in this very step
                self.control.apply_settings(self._apply, self.step_index, self._on_reject)
            if self.overridden:  # whatever the loop's own scheduler wrote since
                self.rates.write(self.rates.at_step(self.step_index))
            self._used = [float(g["lr"]) for g in self.optimizer.param_groups]
            if self._grad_norm:
                grads = [p.grad for p in self._params if p.grad is not None]
                if grads:
                    self._gn2 = torch.stack(torch._foreach_norm(grads)).square().sum()
        except Exception as exc:  # noqa: BLE001
            self._broken(exc)

    def _apply(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        step = self.step_index
        if kind in ("set_lr", "set_schedule"):
            if not self.overridden:
                self.rates.lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
            self.overridden = True
            if kind == "set_lr":
                self.rates.set_lr(data["lr"], step)
            else:
                self.rates.set_schedule(data["spec"], step, has_validation=True)
        elif kind == "set_hyperparams":
            apply_hyperparams(self.optimizer, data.get("momentum"), data.get("weight_decay"))
        self.rec.event(kind, dict(data), step)
        return dict(data)

    def _on_pause(self) -> None:
        self._flush()
        self.rec.state = RunState.PAUSED
        self.rec.event("pause", {}, self.step_index)

    def _on_resume(self) -> None:
        self.rec.state = RunState.RUNNING
        self.rec.event("resume", {}, self.step_index)

    def _on_reject(self, kind: str, exc: LrvizError) -> None:
        self.rec.event("rejected", {"kind": kind, "message": str(exc)}, self.step_index)

    def _flush(self) -> None:
        if self._staging is not None:
            flushed = self._staging.flush(self.rec.clock())
            if flushed is not None:
                self._check(flushed)

    def _check(self, flushed: Any) -> None:
        first, loss, _ = flushed
        missing = set(self._missing)
        self._missing.clear()
        bad = [i for i, v in enumerate(loss.tolist()) if not math.isfinite(v) and first + i not in missing]
        if bad:
            self._nonfinite(first + bad[0], float(loss[bad[0]]))

    def _nonfinite(self, step: int, value: float) -> None:
        if "nonfinite" in self._warned:
            return
        self._warn_once("nonfinite", f"lrviz: the loss became {value} at step {step} (recorded; lrviz keeps "
                        "recording, your loop decides what to do)")
        self.rec.event("warning", {"kind": "nonfinite", "message": f"the loss became {value} at step {step}",
                                   "value": str(value)}, step)

    def _broken(self, exc: BaseException) -> None:
        """An error inside lrviz: say it once, mark the run, stop recording; training goes on."""
        if self._off:
            return
        self._off = True
        self._fast = False
        self.error = f"lrviz stopped recording: {type(exc).__name__}: {exc}"
        if self.dist is not None:  # the other ranks stop recording too (their exchange fails); training goes on
            err = LrvizError(self.error)
            err.__cause__ = exc
            told = self.dist.failed(err)
            if told is not err:
                self.error = f"lrviz stopped recording: {told}"
        self.error_detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(f"lrviz: warning: {self.error} (your training continues; the run is marked failed)", file=sys.stderr)
        log.debug("%s", self.error_detail)
        try:
            if self.rec.writer is not None:
                self.rec.state = RunState.FAILED
                self.rec.close(self.summary(), self.error)
        except Exception:  # noqa: BLE001
            pass
        self.done.set()

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        if not self.quiet:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _config(self) -> dict[str, Any]:
        opt = self.optimizer
        g = opt.param_groups[0]
        out = {"optimizer": "+".join(type(o).__name__ for o in self.optimizers), "lr": float(g["lr"]),
               "param_groups": len(opt.param_groups)}
        for key in ("momentum", "weight_decay", "betas"):
            if key in g:
                out[key] = g[key]
        if self.total_steps:
            out["steps"] = self.total_steps
        if self.dist is not None:
            out["distributed"] = self.dist.describe()
        out.update(self.settings)
        return out

    def _serve(self) -> None:
        from .live.serve import serve_recorded

        listen = self.listen if isinstance(self.listen, str) else None
        self._endpoint = serve_recorded(self, self.store, listen=listen, announce=listen is not None and not self.quiet)


class Optimizers:
    """Several optimizers stepped by one loop, seen as one: their param groups, in order."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]


def _open_store(store: Any) -> Any:
    if store is None:
        return None
    from .store.runs import RunStore

    if store is _DEFAULT:
        return RunStore(None)
    if hasattr(store, "create_run"):
        return store
    return RunStore(store)


def _main_script() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return os.path.abspath(path) if path else "<interactive>"


def _hash_of(path: str) -> str:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""
