"""Recording a step without waiting on the device: the flat-gradient norm and device staging.

:class:`GradNorm` measures the gradient norm of every step with one dot product. :class:`Staging`
keeps each step's loss and squared gradient norm on the device (an accelerator) and copies them to
the step buffer in one transfer per ``STAGE_STEPS`` steps (or per ``FLUSH_SECONDS``), so a GPU run
never syncs the host per step; on the CPU it writes each row at once. Shared by the engine and
``lrviz.track``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: On an accelerator, losses stay on the device and are copied in one transfer per this many steps
#: (or per FLUSH_SECONDS of the run's time, whichever comes first).
STAGE_STEPS = 256
FLUSH_SECONDS = 0.1


class GradNorm:
    """Gradient norm per step, cheaply.

    After a first ordinary step shows every parameter receives a gradient, the gradients are bound
    as views into one flat buffer (``flat``): zeroing is one kernel and the squared norm one dot
    product. Otherwise it falls back to a foreach norm over the gradients there are.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.flat: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        self.decided = False

    def squared(self) -> torch.Tensor:
        """The squared norm of all gradients (a 0-d tensor on the parameters' device)."""
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
            return torch.zeros((), device=self.params[0].device if self.params else None)
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


class Staging:
    """Writes steps into a :class:`~lrviz.records.StepBuffer`: at once on the host, or staged on the device.

    ``record`` takes the loss and squared gradient norm as tensors. On the host it returns the row's
    ``(loss, grad_norm)`` floats; staged, it returns None and the rows appear at the next flush,
    which returns ``(first_step, losses, grad_norms)`` as NumPy arrays for the caller to check.
    """

    def __init__(self, buffer: Any, device: torch.device | None, on_host: bool):
        self.buffer = buffer
        self.on_host = on_host
        self.staged = 0
        self.last_flush = 0.0
        self._loss: torch.Tensor | None = None
        self._gn: torch.Tensor | None = None
        if not on_host:
            dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64  # no f64 on MPS
            self._loss = torch.zeros(STAGE_STEPS, dtype=dtype, device=device)
            self._gn = torch.zeros(STAGE_STEPS, dtype=dtype, device=device)

    def record_host(self, epoch: int, now: float, loss: torch.Tensor, gn2: torch.Tensor,
                    lrs: Sequence[float]) -> tuple[float, float]:
        """Write the row now (one host sync: the CPU path); its loss and gradient norm."""
        lf = loss.item()
        gn = math.sqrt(gn2.item())
        self.buffer.append(epoch, now, lf, gn, lrs)
        return lf, gn

    def stage(self, epoch: int, now: float, loss: torch.Tensor, gn2: torch.Tensor,
              lrs: Sequence[float]) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Keep the row's loss on the device; flush when the stage is full or FLUSH_SECONDS passed."""
        j = self.staged
        buf = self.buffer
        row = buf.n + j
        cols = buf.reserve_row(row)
        cols.epoch[row] = epoch
        cols.time[row] = now
        cols.lr[row] = lrs
        self._loss[j] = loss.detach()
        self._gn[j] = gn2.detach()
        self.staged = j + 1
        if self.staged >= STAGE_STEPS or now - self.last_flush >= FLUSH_SECONDS:
            return self.flush(now)
        return None

    def flush(self, now: float) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Copy the staged rows to the buffer in one transfer and publish them."""
        j = self.staged
        if not j or self._loss is None:
            return None
        host = torch.stack((self._loss[:j], self._gn[:j])).cpu().numpy()  # one transfer
        buf = self.buffer
        n = buf.n
        cols = buf.reserve_row(n + j - 1)
        loss = host[0]
        gn = np.sqrt(host[1])
        cols.loss[n:n + j] = loss
        cols.grad_norm[n:n + j] = gn
        self.staged = 0
        self.last_flush = now
        buf.n = n + j
        return buf.first_step + n, loss, gn
