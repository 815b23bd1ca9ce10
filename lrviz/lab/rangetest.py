"""The learning-rate range test: sweep the rate up exponentially, watch the loss, suggest a rate.

:func:`range_test` trains ``model`` for up to ``steps`` optimizer steps while the learning rate
grows from ``start`` to ``end`` (``lr_i = start * (end / start) ** (i / (steps - 1))``), records
each batch's loss and its debiased exponential moving average, and stops early once the smoothed
loss exceeds ``stop_factor`` times its best or the loss is not finite. Whatever happens (a finished
sweep, an early stop, a cancel, an exception in the user's code) the model's parameters, buffers
and gradients, the optimizer's state and param groups, the modules' train/eval modes and the random
number generators (Python, NumPy, torch CPU, CUDA/MPS when present) are put back bit for bit, so
the sweep can run mid-training from the current weights.

:func:`suggest` reads a curve (``lrs``, raw ``losses``) and returns several suggestions at once
(:class:`Suggestions`): ``steepest``, ``valley`` and ``minimum_tenth``, judged on the part of the
smoothed curve that fastai's ``lr_find`` judges; ``valley`` and ``minimum_tenth`` are fastai's
``valley`` and ``minimum`` (``fastai/callback/schedule.py``) and equal them for the same curve. When the curve is too short
or never falls, every suggestion is ``None`` and ``reason`` says why: it never guesses.

:func:`find_lr` is the headless entry point (``lrviz find-lr``): it builds model, data and
optimizer from an experiment exactly as :class:`lrviz.engine.TrainingEngine` does and runs the test.

This module never imports Qt and never prints; progress goes through ``on_step``.

Why ~700 lines in one module: the range test and the confirmation share the snapshot that restores
everything bit for bit and the step they make as the run would; the curve and its suggestions, which
need no torch, already live apart (:mod:`lrviz.lab.rangecurve`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import parse_positive
from ..devices import to_device
from ..errors import ConfigError, LrvizError, ScriptError
from ..staging import GradNorm
from .rangecurve import (  # the curve, its suggestions and a confirmation's judgement: no torch
    CONFIRM_STEPS,
    METHODS,
    MIN_POINTS,
    TRIM_END,
    Confirmation,
    RangeTestProgress,
    RangeTestResult,
    Suggestions,
    Trial,
    _check_confirm_steps,
    _check_sweep,
    _fmt,
    _judge,
    adopt,
    candidates,
    confirm_cost,
    held_out,
    loss_axis_range,
    min_steps,
    smooth,
    suggest,
    valley_index,
)

__all__ = [
    "CONFIRM_STEPS",
    "METHODS",
    "MIN_POINTS",
    "TRIM_END",
    "Confirmation",
    "RangeTestProgress",
    "RangeTestResult",
    "Suggestions",
    "Trial",
    "adopt",
    "candidates",
    "confirm_cost",
    "confirm_experiment",
    "confirm_rates",
    "find_lr",
    "held_out",
    "loss_axis_range",
    "min_steps",
    "range_test",
    "smooth",
    "suggest",
    "valley_index",
    "write_csv",
]

log = logging.getLogger(__name__)

LossOf = Callable[[torch.nn.Module, Any], torch.Tensor]


# --------------------------------------------------------------------------- saving and restoring


class _Snapshot:
    """Everything a range test changes, saved bit for bit and put back by :meth:`restore`.

    The model's parameters, buffers (persistent or not) and gradients are restored into the very
    tensor objects they were (the optimizer and anything else holding them keep working), each
    module's ``training`` flag, the optimizer's per-parameter state and param-group settings, and
    the random number generators: the global ones and those of ``data`` (a DataLoader's own
    ``generator=`` and its sampler's), which iterating it draws from.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Any = None):
        self.model = model
        self.optimizer = optimizer
        self.data_rngs = [(g, g.get_state()) for g in _generators_of(data)]
        self.modes = [(m, m.training) for m in model.modules()]
        # (slot dict, name, the tensor object, a copy of its values, its grad object, a copy of the grad)
        self.slots: list[tuple[dict[str, Any], str, Any, Any, Any, Any]] = []
        seen: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for m in model.modules():
                for slots in (m._parameters, m._buffers):
                    for name, t in slots.items():
                        if t is None:
                            self.slots.append((slots, name, None, None, None, None))
                            continue
                        if id(t) in seen:  # tied weights: save once, restore the slot's identity
                            self.slots.append((slots, name, t, None, None, None))
                            continue
                        seen[id(t)] = t
                        g = t.grad if isinstance(t, torch.nn.Parameter) else None
                        self.slots.append((slots, name, t, t.detach().clone(), g,
                                           None if g is None else g.detach().clone()))
        self.extra_params = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in seen]
        self.extra = [(p, p.detach().clone(), p.grad, None if p.grad is None else p.grad.detach().clone())
                      for p in {id(p): p for p in self.extra_params}.values()]
        # Optimizer: per-parameter state (deep copies, one call so aliasing is kept) and group settings.
        keys = list(optimizer.state.keys())
        self.state_keys = keys
        self.state_values = copy.deepcopy([optimizer.state[k] for k in keys])
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                       for g in optimizer.param_groups]
        self.group_params = [g["params"] for g in optimizer.param_groups]
        # Random number generators.
        self.py_rng = random.getstate()
        self.np_rng = np.random.get_state()
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        mps = getattr(torch, "mps", None)
        mps_backend = getattr(torch.backends, "mps", None)
        self.mps_rng = (mps.get_rng_state() if mps is not None and mps_backend is not None
                        and mps_backend.is_available() else None)

    def restore(self) -> None:
        with torch.no_grad():
            for slots, name, t, values, g, gvalues in self.slots:
                slots[name] = t
                if values is not None:
                    t.copy_(values)
                if isinstance(t, torch.nn.Parameter) and values is not None:
                    self._restore_grad(t, g, gvalues)
            for p, values, g, gvalues in self.extra:
                p.copy_(values)
                self._restore_grad(p, g, gvalues)
        for m, training in self.modes:
            m.training = training
        opt = self.optimizer
        opt.state.clear()
        # copies: the optimizer updates its state in place, and a snapshot may be restored again
        for k, v in zip(self.state_keys, copy.deepcopy(self.state_values)):
            opt.state[k] = v
        for group, saved, params in zip(opt.param_groups, self.groups, self.group_params):
            group.clear()
            group["params"] = params
            group.update(copy.deepcopy(saved))
        for g, state in self.data_rngs:
            g.set_state(state)
        self.restore_rng()

    def restore_rng(self) -> None:
        """Put back only the random number generators."""
        random.setstate(self.py_rng)
        np.random.set_state(self.np_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if self.mps_rng is not None:
            torch.mps.set_rng_state(self.mps_rng)

    @staticmethod
    def _restore_grad(p: torch.Tensor, g: torch.Tensor | None, gvalues: torch.Tensor | None) -> None:
        if g is None:
            p.grad = None
            return
        g.copy_(gvalues)
        if p.grad is not g:
            p.grad = g


def _generators_of(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that iterating ``data`` draws from: its own ``generator``
    and those of its ``sampler`` and ``batch_sampler`` (a DataLoader's), looked for a few levels
    deep (also inside lrviz's wrapper of a script's data)."""
    found: dict[int, torch.Generator] = {}
    level = [data]
    for _ in range(4):
        nxt = []
        for obj in level:
            if obj is None:
                continue
            g = getattr(obj, "generator", None)
            if isinstance(g, torch.Generator):
                found[id(g)] = g
            for name in ("sampler", "batch_sampler", "data"):
                sub = getattr(obj, name, None) if not isinstance(obj, torch.Tensor) else None
                if sub is not None and not isinstance(sub, (torch.Tensor, np.ndarray)):
                    nxt.append(sub)
        level = nxt
    return list(found.values())


# --------------------------------------------------------------------------- the sweep


def _batches_forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield batches, iterating ``batches`` again (a new epoch) whenever it is exhausted."""
    epoch = 0
    while True:
        got = False
        for batch in batches:
            got = True
            yield batch
        epoch += 1
        if not got:
            hint = (" (was it a one-shot iterator? pass a list or a DataLoader, which can be iterated "
                    "every epoch)") if epoch > 1 else ""
            raise ConfigError(f"the range test's data yielded no batches in epoch {epoch}{hint}")


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        cur = g["lr"]
        if isinstance(cur, torch.Tensor):
            cur.fill_(lr)
        else:
            g["lr"] = lr


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(f"the loss function returned {type(loss).__name__}; it must return a scalar tensor")
    if loss.numel() != 1:
        raise ConfigError(f"the loss function returned a tensor of shape {list(loss.shape)}; it must return "
                          "a scalar (reduce it with .mean())")
    if not loss.requires_grad:
        raise ConfigError("the loss function returned a tensor that does not require grad; compute it from "
                          "the model's output without .detach() or torch.no_grad()")


def range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_of: LossOf,
    *,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    stop_factor: float = 4.0,
    device: torch.device | str | None = None,
    should_stop: Callable[[], bool] | None = lambda: False,
    on_step: Callable[[int, float, float], Any] | None = None,
    method: str = "valley",
    confirm: bool | None = False,
    confirm_steps: int = CONFIRM_STEPS,
    on_confirm_step: Callable[[int, int, float, float], Any] | None = None,
    amp: str | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
) -> RangeTestResult:
    """Sweep the learning rate from ``start`` to ``end`` exponentially over ``steps`` optimizer steps.

    Each step sets every param group's lr, computes ``loss_of(model, batch)`` (batches moved to
    ``device`` when it is not the CPU), records the loss, and (when it is finite) steps the
    optimizer. ``batches`` is iterated again whenever it runs out. The sweep stops early when the
    smoothed loss exceeds ``stop_factor`` times its best (for a negative best: rises by
    ``stop_factor - 1`` times its magnitude), when the loss is not finite, or when
    ``should_stop()`` (polled before every step) returns True. ``on_step(i, lr, loss)`` is
    called after every step. The model runs in train mode.

    ``amp``, ``accumulate`` and ``clip_grad_norm`` make each step as the run does
    (:class:`lrviz.update.UpdateStep`): one step is one update over ``accumulate`` batches, its loss the
    mean of theirs; the forward pass under autocast (fp16 with a fresh gradient scaler, which skips the
    update of a step whose gradients overflow); the gradients clipped before the update.

    Then, when there are suggestions and ``confirm`` is True (or None, "auto", and the
    confirmation costs fewer steps than the sweep took), :func:`confirm_rates` trains the
    :func:`candidates` from the same weights for ``confirm_steps`` steps each (made the same way);
    the rate that lowered the loss most becomes ``suggestions.confirmed`` and the chosen suggestion.
    ``on_confirm_step(trial, i, lr, loss)`` follows it. ``confirm_note`` says why it did not run.

    Model, optimizer and random number generators are restored exactly afterwards (in a
    ``finally:``, so also when ``loss_of`` raises; the exception then propagates). Bad settings
    raise :class:`ConfigError` before anything runs. One host sync per step reads the loss (the
    early stop needs it).
    """
    start, end, steps, beta, stop_factor, method = _check_sweep(start, end, steps, beta, stop_factor, method)
    confirm_steps = _check_confirm_steps(confirm_steps)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"range test needs a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"range test needs a torch.optim.Optimizer, not {type(optimizer).__name__}")
    if not isinstance(batches, Iterable):  # not iter(): creating a DataLoader iterator draws from the RNG
        raise ConfigError(f"range test data of type {type(batches).__name__} cannot be iterated")
    dev = torch.device(device) if device is not None else None
    move = dev is not None and dev.type != "cpu"
    upd = _update_step(optimizer, dev, amp, accumulate, clip_grad_norm)
    plan = start * (end / start) ** (np.arange(steps) / (steps - 1))
    lrs = np.full(steps, np.nan)
    losses = np.full(steps, np.nan)
    smoothed = np.full(steps, np.nan)
    stop_reason = ""
    done = 0
    avg = 0.0
    bpow = 1.0
    best = math.inf
    t0 = time.perf_counter()
    snapshot = _Snapshot(model, optimizer, batches)
    upd_norm = GradNorm(upd.params) if upd is not None else None
    try:
        model.train()
        data = _batches_forever(batches)
        with torch.enable_grad():
            for i in range(steps):
                if should_stop is not None and should_stop():
                    stop_reason = f"cancelled after {i} of {steps} steps"
                    break
                lr = float(plan[i])
                _set_lr(optimizer, lr)
                value, loss = _forward(model, optimizer, upd, data, loss_of, dev if move else None, first=i == 0)
                avg = beta * avg + (1 - beta) * value
                bpow *= beta
                sm = avg / (1 - bpow)
                lrs[i], losses[i], smoothed[i] = lr, value, sm
                done = i + 1
                if not math.isfinite(value):
                    stop_reason = f"the loss became {value} at lr {_fmt(lr)}"
                elif sm < best:
                    best = sm
                elif sm > best + (stop_factor - 1) * abs(best):
                    stop_reason = f"smoothed loss exceeded {stop_factor:g}x its best at lr {_fmt(lr)}"
                if not stop_reason:
                    _update(optimizer, upd, upd_norm, loss)
                del loss
                if on_step is not None:
                    on_step(i, lr, value)
                if stop_reason:
                    break
        # Drop the graph and grads of the last step before the restore puts the originals back.
        model.zero_grad(set_to_none=True)
    finally:
        snapshot.restore()
    seconds = time.perf_counter() - t0
    lrs, losses, smoothed = lrs[:done], losses[:done], smoothed[:done]
    sugg = suggest(lrs, losses, beta=beta, method=method, num_it=steps)
    n_finite = int(np.isfinite(losses).sum())
    if sugg.reason is not None:
        too_short = sugg.reason.startswith(("only ", "the loss diverged after only"))
        plural = "s" if done != 1 else ""
        if done == 0:
            sugg.reason = "cancelled before the first step"
        elif n_finite == 0:
            sugg.reason = (f"no finite losses: the loss was {losses[0]} from the first step (lr {_fmt(start)}); "
                           "check the model and the data, or lower --start")
        elif too_short and stop_reason.startswith("cancelled"):
            sugg.reason = (f"cancelled after only {done} step{plural}; at least {min_steps(steps)} of "
                           f"{steps} are needed")
        elif too_short and stop_reason:
            sugg.reason = (f"the loss diverged after only {done} step{plural} (at lr {_fmt(float(lrs[-1]))}); "
                           "lower --start")
    log.debug("range test: %d steps in %.3fs; %s; suggestions %s", done, seconds,
              stop_reason or "all steps done", sugg.to_dict())
    result = RangeTestResult(lrs, losses, smoothed, bool(stop_reason), stop_reason, sugg, start=start, end=end,
                             steps=steps, beta=beta, stop_factor=stop_factor, seconds=seconds)
    if confirm is False or sugg.reason is not None or stop_reason.startswith("cancelled"):
        return result
    cands = candidates(sugg)
    cost = confirm_cost(len(cands), confirm_steps)
    if confirm is None and cost >= done:
        result.confirm_note = (f"not confirmed: {len(cands)} rates x {confirm_steps} steps would cost about "
                               f"{cost:.0f} steps, more than the range test's {done} (ask for it with --confirm)")
        return result
    result.confirmation = confirm_rates(model, optimizer, batches, loss_of, cands, steps=confirm_steps,
                                        stop_factor=stop_factor, device=device, should_stop=should_stop,
                                        on_step=on_confirm_step, amp=amp, accumulate=accumulate,
                                        clip_grad_norm=clip_grad_norm)
    adopt(result)
    return result


def confirm_rates(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_of: LossOf,
    rates: Sequence[tuple[float, str]] | Sequence[float],
    *,
    steps: int = CONFIRM_STEPS,
    stop_factor: float = 4.0,
    device: torch.device | str | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, float, float], Any] | None = None,
    amp: str | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
) -> Confirmation:
    """Train each rate of ``rates`` for ``steps`` steps from the same weights on the same batches;
    the one whose loss fell most wins.

    The first ``steps`` batches of ``batches`` are taken once, and :func:`held_out` more after
    them; before each rate, model, optimizer and random number generators are put back as they
    were, so every rate starts from the same point and sees the same batches (and the same
    dropout). A rate whose loss turns non-finite or exceeds ``stop_factor`` times its first loss
    has diverged. After its steps, each rate's weights are measured on the held-out batches (train
    mode, no gradients, the same random numbers for every rate): the winner has the lowest mean
    loss there, and only when that is below the starting weights' own. Afterwards everything is
    restored exactly, as after :func:`range_test`. ``on_step(trial, i, lr, loss)`` follows the
    steps; ``should_stop()`` ends it early (no winner). ``amp``, ``accumulate`` and ``clip_grad_norm``
    make each step as :func:`range_test` makes its steps (a step takes ``accumulate`` batches; each
    rate gets a fresh fp16 gradient scaler), and the held-out losses are measured under the same autocast.
    """
    steps = _check_confirm_steps(steps)
    pairs = [(r, "") if not isinstance(r, tuple) else r for r in rates]
    if not pairs:
        raise ConfigError("no learning rates to confirm")
    pairs = [(parse_positive(lr, "learning rate to confirm"), str(src)) for lr, src in pairs]
    dev = torch.device(device) if device is not None else None
    move = dev is not None and dev.type != "cpu"
    upd = _update_step(optimizer, dev, amp, accumulate, clip_grad_norm)
    per_step = upd.accumulate if upd is not None else 1
    trials: list[Trial] = []
    cancelled = False
    t0 = time.perf_counter()
    snapshot = _Snapshot(model, optimizer, batches)

    def measure() -> np.ndarray:
        snapshot.restore_rng()  # the same dropout for every rate
        with torch.no_grad(), upd.autocast() if upd is not None else contextlib.nullcontext():
            return np.array([float(loss_of(model, to_device(b, dev) if move else b).detach()) for b in probe])

    try:
        data = _batches_forever(batches)
        fixed = [next(data) for _ in range(steps * per_step + held_out(steps))]
        data.close()
        fixed, probe = fixed[:steps * per_step], fixed[steps * per_step:]
        model.train()
        start = float(np.mean(measure()))
        for k, (lr, source) in enumerate(pairs):
            if should_stop is not None and should_stop():
                cancelled = True
                break
            snapshot.restore()
            model.train()
            _set_lr(optimizer, lr)
            values: list[float] = []
            diverged = False
            upd_norm = None
            if upd is not None:  # a fresh one (its own gradient scaler) for every rate
                upd = _update_step(optimizer, dev, amp, accumulate, clip_grad_norm)
                upd_norm = GradNorm(upd.params)
            with torch.enable_grad():
                for i in range(steps):
                    if i and should_stop is not None and should_stop():
                        cancelled = True
                        break
                    group = iter(fixed[i * per_step:(i + 1) * per_step])
                    value, loss = _forward(model, optimizer, upd, group, loss_of, dev if move else None, first=i == 0)
                    values.append(value)
                    if on_step is not None:
                        on_step(k, i, lr, value)
                    first = values[0]
                    if not math.isfinite(value) or (i and value > first + (stop_factor - 1) * abs(first)):
                        diverged = True
                        break
                    _update(optimizer, upd, upd_norm, loss)
                    del loss
            if cancelled:
                break
            held = np.zeros(0) if diverged else measure()
            end = float(np.mean(held)) if held.size else math.inf
            trials.append(Trial(lr, source, np.array(values, dtype=np.float64), diverged or not math.isfinite(end),
                                start, end, held))
        model.zero_grad(set_to_none=True)
    finally:
        snapshot.restore()
    seconds = time.perf_counter() - t0
    winner, reason = _judge(trials, steps, len(pairs), cancelled)
    log.debug("confirmation: %s (%.3fs)", reason, seconds)
    return Confirmation(trials, steps, winner, reason, seconds)


def _update_step(optimizer: torch.optim.Optimizer, dev: torch.device | None, amp: str | None, accumulate: Any,
                 clip_grad_norm: Any) -> Any:
    """The UpdateStep of a range test with those settings (None: a plain step); ConfigError when one is bad."""
    from ..config import RunConfig
    from ..update import UpdateStep, check_amp

    cfg = RunConfig(amp=amp, accumulate=accumulate, clip_grad_norm=clip_grad_norm).validated()
    where = dev if dev is not None else torch.device("cpu")
    check_amp(cfg.amp, where)
    upd = UpdateStep(optimizer, where, amp=cfg.amp, accumulate=cfg.accumulate, clip_grad_norm=cfg.clip_grad_norm)
    return None if upd.plain else upd


def _forward(model: torch.nn.Module, optimizer: torch.optim.Optimizer, upd: Any, data: Iterator[Any],
             loss_of: LossOf, dev: torch.device | None, *, first: bool) -> tuple[float, torch.Tensor | None]:
    """The forward pass of one step of the range test or the confirmation, on the next batch of ``data`` (the
    next ``upd.accumulate`` with an UpdateStep), gradients zeroed first: the loss's value, and the loss tensor
    whose backward :func:`_update` makes (None with an UpdateStep, which ran its micro-batches' backward)."""
    model.zero_grad(set_to_none=True)
    optimizer.zero_grad(set_to_none=True)
    if upd is not None:  # mixed precision, accumulation or clipping
        return _accumulate(upd, model, data, loss_of, dev, first=first), None
    batch = next(data)
    loss = loss_of(model, to_device(batch, dev) if dev is not None else batch)
    if first:
        _check_loss(loss)
    return float(loss.detach()), loss


def _update(optimizer: torch.optim.Optimizer, upd: Any, upd_norm: GradNorm | None, loss: torch.Tensor | None) -> None:
    """The update of a step whose forward :func:`_forward` made (and whose loss was judged worth it)."""
    if upd is not None:
        upd.finish(upd_norm, upd.accumulate)
        upd.step()
    else:
        loss.backward()
        optimizer.step()


def _accumulate(upd: Any, model: torch.nn.Module, data: Iterator[Any], loss_of: LossOf, dev: torch.device | None,
                *, first: bool) -> float:
    """Forward and backward of one step's micro-batches; the mean of their losses (one host sync each)."""
    total = 0.0
    for j in range(upd.accumulate):
        batch = next(data)
        if dev is not None:
            batch = to_device(batch, dev)
        with upd.autocast():
            loss = loss_of(model, batch)
        if first and j == 0:
            _check_loss(loss)
        total += float(loss.detach())
        upd.backward(loss)
        del loss
    return total / upd.accumulate


# --------------------------------------------------------------------------- headless


class _ScriptData:
    """The script's training data, with failures while iterating reported as ScriptErrors."""

    def __init__(self, data: Iterable[Any], path: Path):
        self.data = data
        self.path = path
        self.epoch = 0

    def __iter__(self) -> Iterator[Any]:
        self.epoch += 1
        it = iter(self.data)
        got = False
        while True:
            try:
                batch = next(it)
            except StopIteration:
                break
            except LrvizError:
                raise
            except Exception as exc:
                from ..experiment import error_from_exception

                raise error_from_exception(exc, self.path, f"iterating the training data (epoch {self.epoch})"
                                           ) from exc
            got = True
            yield batch
        if not got:
            what = "in epoch 1" if self.epoch == 1 else f"in epoch {self.epoch} (was it a one-shot iterator?)"
            raise ScriptError(f"build_data()'s training data yielded no batches {what}", str(self.path))


def _build(experiment: Any, config: Any, what: str) -> tuple[Any, ...]:
    """Seed, then build model, training data, optimizer and loss the way the engine does; and how the
    config makes each step (``amp``, ``accumulate``, ``clip_grad_norm``, as keyword arguments)."""
    from ..devices import resolve_device
    from ..engine import seed_everything
    from ..optim import build_optimizer

    cfg = config.validated()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = experiment.make_model(cfg.params).to(device)
    train, _val = experiment.make_data(cfg.batch_size, cfg.params)
    opt = experiment.make_optimizer(model, cfg.lr)
    if opt is None:
        opt = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay,
                              cfg.nesterov)
    script_loss = experiment.loss_function()
    fn = "compute_loss()" if callable(getattr(experiment.module, "compute_loss", None)) else "loss_fn()"
    path = str(experiment.path)
    step = [0]
    checked = [False]
    per_step = cfg.accumulate

    def loss_of(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        i = step[0]
        step[0] += 1
        try:
            loss = script_loss(m, batch)
        except Exception as exc:
            where = f"{what} step {i // per_step}, micro-batch {i % per_step + 1} of {per_step}" if per_step > 1 \
                else f"{what} step {i}"
            raise experiment.describe_batch_error(exc, batch, where) from exc
        if not checked[0] and torch.is_grad_enabled():  # the first loss that is trained on
            checked[0] = True
            try:
                _check_loss(loss)
            except ConfigError as exc:
                raise ScriptError(str(exc).replace("the loss function", fn, 1), path) from None
        return loss

    settings = {"amp": cfg.amp, "accumulate": cfg.accumulate, "clip_grad_norm": cfg.clip_grad_norm}
    return model, opt, _ScriptData(train, experiment.path), loss_of, device, settings


def find_lr(
    experiment: Any,
    config: Any,
    *,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    stop_factor: float = 4.0,
    method: str = "valley",
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float, float], Any] | None = None,
    confirm: bool | None = None,
    confirm_steps: int = CONFIRM_STEPS,
    on_confirm_step: Callable[[int, int, float, float], Any] | None = None,
) -> RangeTestResult:
    """Run the range test on an experiment, headless (``lrviz find-lr``).

    Seeds with ``config.seed`` and builds model, training data and optimizer the way
    :class:`lrviz.engine.TrainingEngine` does (device from ``config.device``; the script's own
    ``build_optimizer`` when it has one, else ``config.optimizer`` with its momentum and weight
    decay), then calls :func:`range_test` with the config's ``amp``, ``accumulate`` and
    ``clip_grad_norm``; ``confirm`` None (the default) confirms the suggestions when that costs fewer
    steps than the sweep. Errors in the script are :class:`ScriptError`
    naming the file and line; bad settings are :class:`ConfigError`.
    """
    _check_sweep(start, end, steps, beta, stop_factor, method)
    _check_confirm_steps(confirm_steps)
    model, opt, data, loss_of, device, settings = _build(experiment, config, "range test")
    return range_test(model, opt, data, loss_of, start=start, end=end,
                      steps=steps, beta=beta, stop_factor=stop_factor, device=device,
                      should_stop=should_stop, on_step=on_step, method=method, confirm=confirm,
                      confirm_steps=confirm_steps, on_confirm_step=on_confirm_step, **settings)


def confirm_experiment(
    experiment: Any,
    config: Any,
    rates: Sequence[tuple[float, str]] | Sequence[float],
    *,
    steps: int = CONFIRM_STEPS,
    stop_factor: float = 4.0,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, float, float], Any] | None = None,
) -> Confirmation:
    """:func:`confirm_rates` on a fresh model of an experiment, built and seeded as :func:`find_lr`
    builds it (so from the weights a range test of the same settings started from)."""
    _check_confirm_steps(steps)
    model, opt, data, loss_of, device, settings = _build(experiment, config, "confirmation")
    return confirm_rates(model, opt, data, loss_of, rates, steps=steps, stop_factor=stop_factor,
                         device=device, should_stop=should_stop, on_step=on_step, **settings)


def write_csv(result: RangeTestResult, path: str | Path) -> None:
    """Write ``lr,loss,smoothed`` rows (shortest round-trip floats, ``nan``/``inf``) atomically."""
    from ..export import atomic_write

    lines = ["lr,loss,smoothed"]
    for a, b, c in zip(result.lrs.tolist(), result.losses.tolist(), result.smoothed.tolist()):
        lines.append(f"{a!r},{b!r},{c!r}")
    atomic_write(path, "\n".join(lines) + "\n")
