"""A Lightning ``Trainer.fit`` with its own DDP strategy on 2 CPU processes, recorded with LrvizCallback,
for the torchrun tests (Lightning finds torchrun's environment and joins it).

Run with torchrun; argv: STORE STEPS LOSSES_DIR. Each rank writes its own losses to LOSSES_DIR (to
check that the recorded loss is the mean over ranks).
"""

import os
import sys

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrviz.integrations.lightning import LrvizCallback


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
        self.mine: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.mine.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    store, steps, losses_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # Lightning shards it per rank
    model = Regression()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LrvizCallback(name="ddp lightning", store=store,
                                                                             quiet=True)])
    trainer.fit(model, loader)
    rank = trainer.global_rank
    with open(os.path.join(losses_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(repr(v) for v in model.mine))


if __name__ == "__main__":
    main()
