"""Recording a step without waiting on the device: the flat-gradient norm and device staging.

:class:`GradNorm` measures the gradient norm of every step with one dot product. :class:`Staging`
keeps each step's loss and squared gradient norm on the device (an accelerator) and copies them to
the step buffer in one transfer per ``STAGE_STEPS`` steps (or per ``FLUSH_SECONDS``), so a GPU run
never syncs the host per step; on the CPU it reads each row at once and writes them in blocks.
Shared by the engine and ``lrviz.track``.
"""

from __future__ import annotations

import math
from array import array
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
    product, from that first step on. Otherwise it falls back to a foreach norm over the gradients
    there are. The two sum in another order (they differ in the last bits), so a run continued from a
    checkpoint measures as its parent did: ``bind=False`` when the parent's gradients were never bound.
    """

    def __init__(self, params: list[torch.nn.Parameter], *, bind: bool = True):
        self.params = params
        self.flat: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        self.decided = not bind

    def squared(self) -> torch.Tensor:
        """The squared norm of all gradients (a 0-d tensor on the parameters' device)."""
        flat = self.flat
        if flat is not None:
            for p, g in zip(self.params, self.views):
                if p.grad is not g:  # the script replaced a gradient: bind it again
                    self._rebind(p, g)
            return torch.dot(flat, flat)
        if not self.decided:
            self.decided = True
            self._try_bind()
            if self.flat is not None:  # the first step sums as every later one (a resume starts with one)
                return torch.dot(self.flat, self.flat)
        grads = [p.grad for p in self.params if p.grad is not None]
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
    """Writes steps into a :class:`~lrviz.records.StepBuffer` in blocks: a few rows at a time on the
    host, or staged on the device.

    ``record_host`` takes the loss and squared gradient norm as tensors, reads them (one host sync:
    the CPU path) and returns ``(loss, grad_norm)`` floats; the row waits in five flat arrays
    (``array.array``: an append is a few dozen ns, and a block goes into the buffer's columns as one
    copy per column, where Python tuples cost ~1.5 µs a row to gather inside a training loop) and the
    block is written every ``HOST_ROWS`` rows or FLUSH_SECONDS. ``stage`` keeps them on the device and
    returns None; the rows appear at the next flush, which returns ``(first_step, losses, grad_norms)``
    as NumPy arrays for the caller to check. Call :meth:`flush` before anything reads the buffer's last
    rows from the training thread (a checkpoint, a pause, validation, the end).
    """

    #: Rows read on the host are written to the buffer this many at a time (or per FLUSH_SECONDS).
    HOST_ROWS = 64
    #: When nobody reads the rows while the run trains (``lrviz.track`` with no store and no listener):
    #: a block per chunk of the buffer, or per second.
    QUIET_ROWS = 4096
    QUIET_SECONDS = 1.0

    def __init__(self, buffer: Any, device: torch.device | None, on_host: bool):
        self.buffer = buffer
        self.on_host = on_host
        self.staged = 0
        self.last_flush = 0.0
        self.block_rows = self.HOST_ROWS
        self.block_seconds = FLUSH_SECONDS
        #: The rows read on the host and not yet written, one flat array per column (``lr``: the
        #: groups' rates row after row); ``appends`` are their bound ``append`` (``extend`` for the
        #: rates), for a per-step path that is only calls.
        self.host = (array("q"), array("d"), array("d"), array("d"), array("d"))
        self.appends = (*(a.append for a in self.host[:4]), self.host[4].extend)
        self._loss: torch.Tensor | None = None
        self._gn: torch.Tensor | None = None
        if not on_host:
            dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64  # no f64 on MPS
            self._loss = torch.zeros(STAGE_STEPS, dtype=dtype, device=device)
            self._gn = torch.zeros(STAGE_STEPS, dtype=dtype, device=device)

    def record_host(self, epoch: int, now: float, loss: torch.Tensor, gn2: torch.Tensor | None,
                    lrs: Sequence[float]) -> tuple[float, float]:
        """Read the row now (one host sync: the CPU path); its loss and gradient norm (None: not measured)."""
        lf = loss.item()
        gn = math.sqrt(gn2.item()) if gn2 is not None else math.nan
        add_epoch, add_time, add_loss, add_gn, add_lrs = self.appends
        add_epoch(epoch)
        add_time(now)
        add_loss(lf)
        add_gn(gn)
        add_lrs(lrs)
        if len(self.host[1]) >= self.block_rows or now - self.last_flush >= self.block_seconds:
            self._write_rows(now)
        return lf, gn

    def quiet(self) -> None:
        """Nobody reads the rows until the run ends: write them in larger, rarer blocks (host rows only;
        whoever reads the buffer from the training thread still calls :meth:`flush` first)."""
        self.block_rows, self.block_seconds = self.QUIET_ROWS, self.QUIET_SECONDS

    def _write_rows(self, now: float) -> None:
        epoch, times, loss, gn, lrs = self.host
        k = len(times)
        if not k:
            return
        buf = self.buffer
        n = buf.n
        buf.write(n, epoch=epoch, time=times, loss=loss, grad_norm=gn, lr=lrs)
        for a in self.host:
            del a[:]
        self.last_flush = now
        buf.publish(n + k)

    def stage(self, epoch: int, now: float, loss: torch.Tensor, gn2: torch.Tensor | None,
              lrs: Sequence[float]) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Keep the row's loss on the device; flush when the stage is full or FLUSH_SECONDS passed."""
        j = self.staged
        buf = self.buffer
        buf.write(buf.n + j, epoch=(epoch,), time=(now,), lr=(lrs,))
        self._loss[j] = loss.detach()
        if gn2 is not None:
            self._gn[j] = gn2.detach()
        else:
            self._gn[j] = math.nan
        self.staged = j + 1
        if self.staged >= STAGE_STEPS or now - self.last_flush >= FLUSH_SECONDS:
            return self.flush(now)
        return None

    def publish(self, now: float) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The flush of an error path (here the same; a distributed run's staging waits on no other rank
        in it: :class:`lrviz.distributed.StepExchange`)."""
        return self.flush(now)

    def flush(self, now: float) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Publish every row recorded so far; staged rows come from the device in one transfer
        (returned for the caller to check; rows read on the host were checked as they came)."""
        if self.host[1]:
            self._write_rows(now)
        j = self.staged
        if not j or self._loss is None:
            return None
        host = torch.stack((self._loss[:j], self._gn[:j])).cpu().numpy()  # one transfer
        buf = self.buffer
        n = buf.n
        loss = host[0]
        gn = np.sqrt(host[1])
        buf.write(n, loss=loss, grad_norm=gn)
        self.staged = 0
        self.last_flush = now
        buf.publish(n + j)
        return buf.first_step + n, loss, gn
