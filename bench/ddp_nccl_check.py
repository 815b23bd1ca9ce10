"""The NCCL path adds no per-step host sync: a check to run on a machine with CUDA GPUs.

Trains a small MLP on every GPU of the machine under torchrun (NCCL, DistributedDataParallel), once with
the lrviz engine (what ``torchrun -m lrviz run`` trains) and once as a plain DDP loop recorded with
``lrviz.track``. After a warm-up, ``torch.cuda.set_sync_debug_mode("warn")`` reports every operation
that makes the host wait for the GPU; the check counts them over the measured steps and compares with
the exchanges lrviz made (one device-to-host copy each: rows reach the host once per exchange, as a
single-GPU run's flush does). It fails when there are more syncs than exchanges. Prints syncs per step, exchanges per second, and steps per second.

    torchrun --standalone --nproc_per_node=$(nvidia-smi -L | wc -l) bench/ddp_nccl_check.py [--steps 3000]

(NCCL needs one GPU a rank: on a one-GPU machine this is a one-rank job, which still runs every part
of the NCCL path: DDP's reductions, lrviz's exchanges, the staging of losses on the device.)
``--device cpu`` runs the same with gloo, counting nothing: a dry run of this script where there is no GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

SCRIPT = '''
import torch
from torch import nn

DEFAULTS = {"lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "seed": 0}
HOOK = {}


def build_model():
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1))


def build_data(batch_size=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * 64, 256, generator=g)
    y = x[:, :1] * 2
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def compute_loss(model, batch):
    if model.training and "on_step" in HOOK:
        HOOK["on_step"]()
    x, y = batch
    return nn.functional.mse_loss(model(x), y)
'''


class SyncCounter:
    """Counts host syncs (and lrviz's exchanges) from training step ``warm`` to ``warm + steps``;
    called at each training step's loss."""

    def __init__(self, warm: int, steps: int, exchanges: Callable[[], int]):
        self.warm, self.steps, self.exchanges = warm, steps, exchanges
        self.seen = self.made = self._e0 = 0
        self.t0 = self.t1 = 0.0

    def __call__(self) -> None:
        cuda = torch.cuda.is_available()
        if self.seen == self.warm:
            if cuda:
                torch.cuda.synchronize()
            self.t0, self._e0 = time.perf_counter(), self.exchanges()
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
        elif self.seen == self.warm + self.steps:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
            self.t1, self.made = time.perf_counter(), self.exchanges() - self._e0
        self.seen += 1

    @property
    def rate(self) -> float:
        return self.steps / (self.t1 - self.t0)


def syncs(caught: list[warnings.WarningMessage]) -> int:
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def check_engine(exp, dist, steps: int, warm: int) -> tuple[int, SyncCounter]:
    """The lrviz engine (rank 0 records into a store, as ``lrviz run`` does)."""
    from lrviz.config import RunConfig
    from lrviz.engine import TrainingEngine
    from lrviz.store.runs import RunStore

    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs.sqlite") if dist.is_main else None
        cfg = RunConfig(**exp.defaults).merged({"steps": warm + steps + 5, "epochs": None,
                                                 "device": dist.device.type})
        eng = TrainingEngine(exp, cfg, store, distributed=dist)
        counter = exp.module.HOOK["on_step"] = SyncCounter(warm, steps, lambda: eng._staging.exchanges)
        if not dist.is_main:
            dist.share(None)  # the plan rank 0's engine sends
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng.run()
        if store is not None:
            store.close()
    assert eng.state == "finished", eng.error
    return syncs(caught), counter


def check_track(exp, dist, steps: int, warm: int) -> tuple[int, SyncCounter]:
    """A plain DDP loop recorded with lrviz.track."""
    from torch.nn.parallel import DistributedDataParallel

    import lrviz

    torch.manual_seed(0)
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    model = DistributedDataParallel(exp.make_model().to(dist.device), device_ids=ids)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches, _ = exp.make_data()
    batches = [(x.to(dist.device), y.to(dist.device)) for x, y in batches]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lrviz.track(opt, model=model, store=None, listen=False, quiet=True) as run:
            counter = exp.module.HOOK["on_step"] = SyncCounter(warm, steps, lambda: run._staging.exchanges)
            for i in range(warm + steps + 1):
                x, y = batches[i % len(batches)]
                loss = exp.module.compute_loss(model, (x, y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run.step(loss)
    return syncs(caught), counter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA here: run this on a machine with GPUs (--device cpu: a dry run with gloo)", file=sys.stderr)
        return 2
    from lrviz.distributed import Distributed
    from lrviz.experiment import load_experiment

    dist = Distributed.from_env(args.device)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / f"nccl_mlp_{os.getpid()}.py"
        script.write_text(SCRIPT)
        exp = load_experiment(script)
        for name, check in (("engine", check_engine), ("track", check_track)):
            n_sync, c = check(exp, dist, args.steps, args.warm)
            ok = ok and n_sync <= c.made
            if dist.is_main:
                print(f"{name:>6}: {n_sync} host syncs in {args.steps} steps ({n_sync / args.steps:.4f} a step), "
                      f"{c.made} exchanges ({c.made * c.rate / args.steps:.1f} a second), {c.rate:,.0f} steps/s "
                      f"on {dist.world_size} rank(s): {'ok' if n_sync <= c.made else 'MORE SYNCS THAN EXCHANGES'}",
                      flush=True)
    if dist.is_main:
        where = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "CPU (dry run)"
        print(f"torch {torch.__version__}, {where}, backend {dist.backend}")
    dist.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
