"""One optimizer update beyond the plain step: mixed precision, gradient accumulation, gradient clipping.

The engine's plain step is forward, backward, step. A run that asks for more (``amp``, ``accumulate``,
``clip_grad_norm``) makes each update with an :class:`UpdateStep` instead, and only such a run pays for
it. The recipe is PyTorch's own ("Automatic Mixed Precision examples", torch.amp):

- the forward pass and the loss run under ``torch.autocast`` on the run's device (bf16, or fp16 with
  a ``torch.amp.GradScaler`` that scales the loss before backward);
- each micro-batch's loss is divided by ``accumulate`` before backward, so the gradients summed over
  the update are those of the mean loss; an epoch's last update, when the batches run out after
  ``k < accumulate`` of them, is the mean of those ``k`` (its gradients rescaled by ``accumulate / k``);
- the gradients are unscaled (fp16), their norm is measured (what the run records: the norm before
  clipping), then clipped with ``torch.nn.utils.clip_grad_norm_``'s formula (norm 2, coefficient
  ``max_norm / (norm + 1e-6)`` when it is below 1; the norm summed as one dot product, so the update
  equals torch's to float rounding, at a seventh of its cost on a small CPU model), and the optimizer
  steps (through the scaler, which skips the update when a gradient is inf or NaN).

:class:`StepWatch` reads the recorded gradient norms as they are published and counts the steps that
were clipped (norm above the threshold) and, in fp16, skipped (norm inf or NaN: exactly the steps the
scaler skipped), with one event per episode. :class:`ScalerAwareGuard` keeps the divergence guard
from taking a skipped step for a divergence. Shared by the engine and the range test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

#: The dtype each mixed-precision setting autocasts to.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Devices where fp16 autocast with a gradient scaler is offered (elsewhere bf16 is the choice).
FP16_DEVICES = ("cuda",)
#: An episode (of clipping, of skipped steps) ends after this many steps in a row without one, so a
#: gradient norm hovering around the threshold makes one episode, not an event every other step.
QUIET_STEPS = 50
#: torch.nn.utils.clip_grad_norm_'s guard against a zero norm.
CLIP_EPS = 1e-6

_NO_AUTOCAST = contextlib.nullcontext()


def check_amp(amp: str | None, device: torch.device) -> None:
    """Refuse mixed precision the run's device cannot do, with what to use instead (ConfigError)."""
    if amp is None:
        return
    kind = device.type
    if amp == "fp16" and kind not in FP16_DEVICES:
        raise ConfigError(f"mixed precision fp16 needs a CUDA GPU (its gradient scaler is for CUDA), and this "
                          f"run's device is {kind}: use bf16 (amp: bf16, --amp bf16), which works on {kind}")
    if not torch.amp.is_autocast_available(kind):
        raise ConfigError(f"mixed precision {amp} is not available on {kind} with torch {torch.__version__}; "
                          "turn it off (amp: off)")
    if amp == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"this GPU ({torch.cuda.get_device_name(device)}) does not support bf16: use fp16")


class UpdateStep:
    """Makes each optimizer update of a run with mixed precision, accumulation and/or clipping.

    ``clip_grad_norm`` may change between updates (steered). Use :meth:`autocast` around the forward
    pass and the loss, :meth:`backward` on each micro-batch's loss, then :meth:`finish` (returns the
    squared gradient norm before clipping) and :meth:`step`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, *, amp: str | None = None,
                 accumulate: int = 1, clip_grad_norm: float | None = None):
        self.optimizer = optimizer
        self.amp = amp
        self.accumulate = int(accumulate)
        self.clip_grad_norm = clip_grad_norm
        self._autocast: Any = (torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp is not None
                               else _NO_AUTOCAST)
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]

    @property
    def plain(self) -> bool:
        """Nothing beyond a plain step is asked (the engine then steps without this object)."""
        return self.amp is None and self.accumulate == 1 and self.clip_grad_norm is None

    def autocast(self) -> Any:
        """The context for the forward pass and the loss (autocast, or nothing in full precision)."""
        return self._autocast

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss: divided by ``accumulate``, scaled in fp16."""
        if self.accumulate != 1:
            loss = loss / self.accumulate
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def finish(self, gnorm: Any, taken: int) -> torch.Tensor:
        """After the micro-batches (``taken`` of them): the gradients of the mean loss, unscaled and
        clipped; returns their squared norm before clipping (a 0-d tensor, no host sync).

        ``gnorm`` (a :class:`~lrviz.staging.GradNorm`) measures the gradients; once it has bound them into
        one flat buffer, clipping scales that buffer in one kernel.
        """
        if taken != self.accumulate:  # the batches ran out: the mean of the ones taken
            self._scale(self.accumulate / taken)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        gn2 = gnorm.squared()
        clip = self.clip_grad_norm
        if clip is not None:  # torch.nn.utils.clip_grad_norm_'s formula, from the norm just measured
            coef = torch.clamp(clip / (gn2.sqrt() + CLIP_EPS), max=1.0)
            if gnorm.flat is not None:  # one kernel (torch's own function costs ~100 us on a small CPU model)
                gnorm.flat.mul_(coef)
            else:
                self._scale(coef)
        return gn2

    def _scale(self, factor: float | torch.Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def step(self) -> None:
        """The optimizer's step (through the gradient scaler in fp16: skipped on inf/NaN gradients)."""
        scaler = self.scaler
        if scaler is None:
            self.optimizer.step()
            return
        scaler.step(self.optimizer)
        scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The gradient scaler's state (fp16), for a checkpoint; None without one."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))


class StepWatch:
    """Counts clipped and skipped steps from the gradient norms a run recorded, as they are published.

    A step was clipped when its recorded gradient norm (before clipping) is finite and above the
    threshold in force (``clip``, changed by the engine between steps after a :meth:`scan`); in fp16 it
    was skipped when that norm is inf or NaN. An episode ends after :data:`QUIET_STEPS` steps in a row
    without one. ``event(kind, data, step)`` records one ``clipping`` event when
    clipping becomes active (``active: true``) and one when it has not clipped for :data:`QUIET_STEPS`
    steps (``active: false``, with the count of the episode), and one ``skipped_steps`` event at the
    start of each episode of skipped steps.
    """

    def __init__(self, buffer: Any, event: Callable[[str, dict[str, Any], int], Any], *, clip: float | None,
                 count_skips: bool):
        self.buffer = buffer
        self.event = event
        self.clip = clip
        self.count_skips = count_skips
        self.scanned = len(buffer)  # rows before this are not ours (a resumed run's) or already counted
        self.clipped = 0
        self.skipped = 0
        self._clip_episode: list[int] | None = None  # [first step, last step, clipped steps] while active
        self._skip_last: int | None = None

    def scan(self) -> None:
        """Look at the rows published since the last scan (cheap when there are none)."""
        buf = self.buffer
        n = buf.n
        if n <= self.scanned:
            return
        if self.clip is None and not self.count_skips:  # nothing to count: never read (or decode) the rows
            self.scanned = n
            return
        v = buf.view(self.scanned, n)
        self.scanned = n
        steps = v["step"]
        gn = v["grad_norm"]
        if self.count_skips:
            bad = np.flatnonzero(~np.isfinite(gn))
            self.skipped += bad.size
            for i in bad.tolist():
                s = int(steps[i])
                if self._skip_last is None or s - self._skip_last > QUIET_STEPS:
                    self.event("skipped_steps", {"grad_norm": str(float(gn[i]))}, s)
                self._skip_last = s
        if self.clip is not None:
            over = np.flatnonzero(np.isfinite(gn) & (gn > self.clip))  # a skipped step was not clipped
            self.clipped += over.size
            ep = self._clip_episode
            for i in over.tolist():
                s = int(steps[i])
                if ep is not None and s - ep[1] > QUIET_STEPS:
                    self._end_clipping()
                    ep = None
                if ep is None:
                    ep = self._clip_episode = [s, s, 0]
                    self.event("clipping", {"active": True, "clip_grad_norm": self.clip,
                                            "grad_norm": float(gn[i])}, s)
                ep[1] = s
                ep[2] += 1
        if self._clip_episode is not None and int(steps[-1]) - self._clip_episode[1] >= QUIET_STEPS:
            self._end_clipping()

    def set_clip(self, clip: float | None) -> None:
        """A new threshold from the next row on (call after the rows so far were published and scanned)."""
        self.scan()
        if clip is None and self._clip_episode is not None:
            self._end_clipping()
        self.clip = clip

    def _end_clipping(self) -> None:
        first, last, count = self._clip_episode  # type: ignore[misc]
        self._clip_episode = None
        self.event("clipping", {"active": False, "first_step": first, "clipped_steps": count}, last)

    def summary(self) -> dict[str, int]:
        """``clipped_steps`` (when clipping was ever on) and ``skipped_steps`` (fp16)."""
        out = {"clipped_steps": self.clipped} if self.clipped or self.clip is not None else {}
        if self.count_skips:
            out["skipped_steps"] = self.skipped
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"clipped": self.clipped, "skipped": self.skipped, "clip_episode": self._clip_episode,
                "skip_last": self._skip_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped = int(state["clipped"])
        self.skipped = int(state["skipped"])
        ep = state.get("clip_episode")
        self._clip_episode = [int(x) for x in ep] if ep else None
        last = state.get("skip_last")
        self._skip_last = None if last is None else int(last)


class ScalerAwareGuard:
    """The divergence guard as an fp16 run feeds it: a step the gradient scaler skipped (a finite loss
    with an inf or NaN gradient norm) changed no weight and is not a divergence, so the guard does not
    see it; a non-finite loss still reaches it."""

    def __init__(self, guard: Any):
        self.guard = guard

    def update(self, step: int, loss: float, grad_norm: float) -> Any:
        if grad_norm - grad_norm != 0.0 and loss - loss == 0.0:
            return None
        return self.guard.update(step, loss, grad_norm)

    def update_many(self, first_step: int, losses: np.ndarray, grad_norms: np.ndarray) -> Any:
        skipped = ~np.isfinite(grad_norms) & np.isfinite(losses)
        if not skipped.any():
            return self.guard.update_many(first_step, losses, grad_norms)
        kept = np.flatnonzero(~skipped)
        # consecutive kept rows go in together, each run from its own first step
        for run in np.split(kept, np.flatnonzero(np.diff(kept) != 1) + 1) if kept.size else []:
            a, b = int(run[0]), int(run[-1]) + 1
            det = self.guard.update_many(first_step + a, losses[a:b], grad_norms[a:b])
            if det is not None:
                return det
        return None

