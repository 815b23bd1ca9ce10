"""A GPT-2-shaped stack of 12 blocks with GPT-2's parameter names (the diagnostics key must fit)."""
import torch
from torch import nn

DEFAULTS = {"lr": 0.01, "optimizer": "adam", "steps": 120, "seed": 0, "batch_size": 32, "eval_every": 25}


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, d), "c_proj": nn.Linear(d, d)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, d)})

    def forward(self, x):
        h = self.attn["c_proj"](torch.tanh(self.attn["c_attn"](self.ln_1(x))))
        return x + self.mlp["c_fc"](torch.tanh(h))


class GPTish(nn.Module):
    def __init__(self, d=16, n=12):
        super().__init__()
        self.transformer = nn.ModuleDict({"wte": nn.Linear(8, d), "h": nn.ModuleList([Block(d) for _ in range(n)])})
        self.lm_head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.transformer["wte"](x)
        for b in self.transformer["h"]:
            h = b(h)
        return self.lm_head(h)


def build_model():
    return GPTish()


def build_data(batch_size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 8, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:896], y[:896]), batch_size=batch_size,
                                        shuffle=True)
    return train, [(x[896:], y[896:])]


loss_fn = nn.MSELoss()
