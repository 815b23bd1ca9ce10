# lrviz: a plain script, not an experiment script
"""Your own training loop, watched and steered by lrviz: two lines added to a plain PyTorch loop.

Run it (it trains a small MLP on a noisy sine, on the CPU, for about a minute)::

    python -m lrviz.resources.examples.own_loop            # or: python path/to/own_loop.py

While it trains, the app's run browser lists it as live (Watch), and from another terminal::

    lrviz steer RUN --lr 0.01        # the rate of the next step; the cosine schedule below stops moving it
    lrviz steer RUN --pause          # the loop blocks in run.step until --resume
    lrviz steer RUN --stop           # run.should_stop becomes True: the loop ends, the run is saved
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import lrviz


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2048, 1, generator=g) * 2 * math.pi - math.pi
    y = torch.sin(x) + 0.1 * torch.randn(x.shape, generator=g)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                        generator=g)
    xv = torch.linspace(-math.pi, math.pi, 256).unsqueeze(1)
    return train, (xv, torch.sin(xv))


def main(argv: list[str] | None = None) -> lrviz.TrackedRun:
    parser = argparse.ArgumentParser(description="A plain PyTorch loop with lrviz.track.")
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--store", default=None, help="the run store (default: lrviz's own)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train, (xv, yv) = data()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train))
    store = {} if args.store is None else {"store": args.store}

    with lrviz.track(optimizer, model=model, name="own loop", steps=args.epochs * len(train), **store) as run:
        print(f"lrviz: run {run.run_id} is live: `lrviz steer {run.run_id} --lr 0.01`, or Watch it in the app",
              flush=True)
        for epoch in range(args.epochs):
            run.set_epoch(epoch)
            for x, y in train:
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                scheduler.step()
                run.step(loss)                 # records the loss and the rate used; applies steering
                if run.should_stop:
                    break
            if run.should_stop:
                break
            with torch.no_grad():
                run.log(val_loss=nn.functional.mse_loss(model(xv), yv).item())
    print(f"lrviz: run {run.run_id} {run.state} after {run.steps_done} steps", flush=True)
    return run


if __name__ == "__main__":
    main()
