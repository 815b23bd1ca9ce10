# lrviz: a plain script, not an experiment script
"""A Lightning 2.x fit, watched and steered by lrviz: one callback added to the Trainer.

Needs Lightning (``pip install 'lrviz[lightning]'``). Run it (a small MLP on a noisy sine, two param
groups, the CPU, about a minute)::

    python -m lrviz.resources.examples.lightning_loop

While it trains, the app's run browser lists it as live (Watch), and ``lrviz steer RUN --lr 0.01``
(``--pause``, ``--resume``, ``--stop``) reaches the trainer's optimizer before its next update.
"""

from __future__ import annotations

import argparse
import math

import lightning.pytorch as L
import torch
from torch import nn

from lrviz.integrations.lightning import LrvizCallback


class SineRegression(L.LightningModule):
    """An MLP whose head learns at a tenth of the body's rate (two param groups), a cosine schedule."""

    def __init__(self, lr: float = 0.05, total_steps: int = 1000):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": self.body.parameters()},
                               {"params": self.head.parameters(), "lr": self.hparams.lr / 10}],
                              lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loaders(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2048, 1, generator=g) * 2 * math.pi - math.pi
    y = torch.sin(x) + 0.1 * torch.randn(x.shape, generator=g)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                        generator=g)
    xv = torch.linspace(-math.pi, math.pi, 256).unsqueeze(1)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, torch.sin(xv)), batch_size=256)
    return train, val


def main(argv: list[str] | None = None) -> LrvizCallback:
    parser = argparse.ArgumentParser(description="A Lightning fit with lrviz's callback.")
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--store", default=None, help="the run store (default: lrviz's own)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    train, val = loaders()
    module = SineRegression(lr=args.lr, total_steps=args.epochs * len(train))
    callback = LrvizCallback(name="lightning", **({} if args.store is None else {"store": args.store}))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, train, val)
    run = callback.run
    print(f"lrviz: run {run.run_id} {run.state} after {run.steps_done} steps", flush=True)
    return callback


if __name__ == "__main__":
    main()
