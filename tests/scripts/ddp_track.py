"""A plain DDP training loop (the user's own) recorded with lrviz.track, for the torchrun tests.

Run with torchrun; argv: STORE STEPS [LOSSES_DIR]. With LOSSES_DIR, each rank writes its own losses
there (to check that the recorded loss is the mean over ranks). ``FAIL_RANK``/``FAIL_STEP``: that
rank's loop raises at that step.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lrviz


def main() -> None:
    store, steps = sys.argv[1], int(sys.argv[2])
    losses_dir = sys.argv[3] if len(sys.argv) > 3 else None
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5
    sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, sampler=sampler)
    mine = []
    fail_at = int(os.environ.get("FAIL_STEP", "-1")) if os.environ.get("FAIL_RANK") == str(rank) else -1
    with lrviz.track(opt, model=model, name="ddp track", store=store, steps=steps, quiet=True) as run:
        step, epoch = 0, 0
        while step < steps and not run.should_stop:
            sampler.set_epoch(epoch)
            for xb, yb in loader:
                if step == fail_at:
                    raise RuntimeError(f"rank {rank}'s loop cannot go on at step {step}")
                loss = nn.functional.mse_loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mine.append(loss.item())
                run.step(loss)
                step += 1
                if step >= steps or run.should_stop:
                    break
            epoch += 1
    if losses_dir:
        with open(os.path.join(losses_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(repr(v) for v in mine))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
