"""A validation pass: the mean loss over the validation data, and the accuracy of class logits."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .devices import to_device
from .errors import ScriptError


def validate(experiment: Any, model: torch.nn.Module, data: Iterable[Any], device: torch.device | None,
             *, after_step: int, check_stop: Callable[[], None] = lambda: None) -> tuple[float, float | None]:
    """``(mean loss, accuracy or None)`` of ``model`` over ``data``, in eval mode and without grad.

    The loss is weighted by batch size (``(inputs, targets)`` batches; a ``compute_loss`` script's
    batches count one each). Accuracy is measured when the outputs are class logits
    (``[batch, classes]`` with integer targets). ``check_stop`` is called before each batch (it
    raises to abandon the pass). One device-to-host copy at the end.
    """
    exp = experiment
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
            for batch in data:
                check_stop()
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
                        if classify and _class_logits(out, y):
                            correct += (out.argmax(1) == y).sum()
                        else:
                            classify = False
                except Exception as exc:
                    raise exp.describe_batch_error(exc, batch, f"validation after step {after_step}") from exc
                total += loss.detach().double() * n
                count += n
    finally:
        model.train()
    if count == 0:
        raise ScriptError("build_data()'s validation data yielded no batches", str(exp.path),
                          exp.line_of("build_data"))
    return float(total) / count, (float(correct) / count if classify else None)


def _class_logits(out: Any, y: Any) -> bool:
    return (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] > 1 and isinstance(y, torch.Tensor)
            and y.ndim == 1 and not y.is_floating_point())
