"""A tiny GPT-like language model built from torch.nn, for the generalization verdict.

Next-token prediction on text from a fixed random Markov chain. Dropout is on while training and
off in validation, so, as with GPT-2, the validation loss sits below the training loss while both
still fall: that is not overfitting.
"""

import torch
from torch import nn

DEFAULTS = {"lr": 1e-2, "optimizer": "adamw", "steps": 300, "eval_every": 20, "seed": 0}
VOCAB, CONTEXT, WIDTH = 16, 24, 32


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=4 * WIDTH, dropout=0.3,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, x):
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))


def build_model():
    return TinyGPT()


def _sequences(n, g, table):
    """``n`` sequences of CONTEXT + 1 tokens; each token depends on the two before it."""
    out = torch.empty(n, CONTEXT + 1, dtype=torch.long)
    out[:, :2] = torch.randint(VOCAB, (n, 2), generator=g)
    for i in range(2, CONTEXT + 1):
        out[:, i] = torch.multinomial(table[out[:, i - 2], out[:, i - 1]], 1, generator=g).squeeze(1)
    return out


def build_data(batch_size=32):
    g = torch.Generator().manual_seed(3)
    table = torch.softmax(5.0 * torch.randn(VOCAB, VOCAB, VOCAB, generator=g), dim=2)
    seqs = _sequences(4096, g, table)
    x, y = seqs[:, :-1], seqs[:, 1:]
    n_val = 128
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[n_val:], y[n_val:]),
                                        batch_size=batch_size, shuffle=True)
    return train, [(x[:n_val], y[:n_val])]


def loss_fn(logits, target):
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
