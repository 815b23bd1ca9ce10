"""Record fastai's own answers as test data (tests/data/fastai_lr_find.json), so the suite tests lrviz's
valley and minimum against fastai's code even where fastai is not installed (it pulls spacy,
torchvision and more; CI does not install it).

Run it with a Python that has fastai (pip install fastai):

    python tests/peers/record_fastai.py tests/data/fastai_lr_find.json

It records (1) fastai.callback.schedule.valley on 300 seeded random curves of 1-80 points, and (2)
fastai's own Learner.lr_find on a small regression for three seeds: its rates, its smoothed losses,
the raw batch losses, and its valley and minimum suggestions.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import SuggestionMethod, valley
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch import nn


def curves(count: int = 300, seed: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(1, 81))
        values = rng.uniform(-50, 50, n)
        ties = rng.random(n) < 0.3  # flat stretches, as the hypothesis strategy draws them
        values[ties] = rng.choice([0.0, 1.0, 2.0], int(ties.sum()))
        lrs = np.logspace(-7, 1, n)
        lr, _ = valley(lrs, values, 100)
        out.append({"values": values.tolist(), "valley_lr": float(lr)})
    return out


def lr_find(seed: int) -> dict:
    class RawLosses(Callback):
        def before_fit(self):
            self.values = []

        def after_batch(self):
            if self.training:
                self.values.append(float(self.learn.loss.detach()))

    torch.manual_seed(seed)
    x = torch.randn(512, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * torch.randn(512, 1)
    ds = torch.utils.data.TensorDataset(x, y)
    dls = DataLoaders(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True),
                      torch.utils.data.DataLoader(ds, batch_size=64))
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    raw = RawLosses()
    with tempfile.TemporaryDirectory() as tmp:
        learn = Learner(dls, model, loss_func=nn.MSELoss(), path=tmp, cbs=[raw])
        with learn.no_bar():
            found = learn.lr_find(show_plot=False, suggest_funcs=(SuggestionMethod.Valley, SuggestionMethod.Minimum))
    rec = learn.recorder
    return {"seed": seed, "lrs": [float(v) for v in rec.lrs], "smoothed": [float(v) for v in rec.losses],
            "raw": raw.values, "valley": float(found.valley), "minimum": float(found.minimum)}


def main() -> None:
    import fastai

    out = Path(sys.argv[1])
    data = {"fastai": fastai.__version__, "torch": torch.__version__, "valley_curves": curves(),
            "lr_find": [lr_find(s) for s in (0, 1, 2)]}
    out.write_text(json.dumps(data, separators=(",", ":")))
    print(f"wrote {out}: {len(data['valley_curves'])} curves, {len(data['lr_find'])} lr_find runs")


if __name__ == "__main__":
    main()
