"""A tiny GPT-like language model: token and position embeddings, two pre-norm transformer blocks with
causal self-attention, a linear head; next-token prediction on synthetic text (motifs chained by a
random grammar, with some noise), with a held-out validation stream from the same source.

What to try: AdamW at 3e-3, then open Diagnostics: the per-layer update-to-weight ratios of the
embeddings, attention and MLP weights sit close together, as Adam's do; with SGD they spread apart.
"""

import torch
from torch import nn

DEFAULTS = {"lr": 3e-3, "optimizer": "adamw", "weight_decay": 0.01, "steps": 600, "batch_size": 32, "seed": 0,
            "eval_every": 50}
VOCAB, CONTEXT, WIDTH, HEADS, LAYERS = 32, 48, 64, 4, 2


def _text(n_tokens: int, seed: int) -> torch.Tensor:
    """Motifs of 3-7 tokens chained by a fixed random grammar, 5 % of tokens replaced by noise."""
    rules = torch.Generator().manual_seed(1234)  # the same language for training and validation
    motifs = [torch.randint(0, VOCAB, (int(torch.randint(3, 8, (1,), generator=rules)),), generator=rules)
              for _ in range(12)]
    follow = torch.softmax(torch.randn(12, 12, generator=rules) * 2.5, dim=1)
    g = torch.Generator().manual_seed(seed)
    chain = torch.multinomial(follow, n_tokens // 3 + 1, replacement=True, generator=g)  # next motif, per motif
    out, state, count = [], 0, 0
    for k in range(n_tokens):
        out.append(motifs[state])
        count += len(motifs[state])
        if count >= n_tokens:
            break
        state = int(chain[state, k])
    text = torch.cat(out)[:n_tokens]
    noise = torch.rand(n_tokens, generator=g) < 0.05
    text[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
    return text


def _batches(text: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n = (len(text) - 1) // CONTEXT
    x = text[: n * CONTEXT].view(n, CONTEXT)
    y = text[1 : n * CONTEXT + 1].view(n, CONTEXT)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n - batch_size + 1, batch_size)]


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(CONTEXT, WIDTH)
        block = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def build_model():
    return TinyGPT()


def build_data(batch_size=32):
    train = _batches(_text(CONTEXT * batch_size * 200 + 1, seed=0), batch_size)
    val = _batches(_text(CONTEXT * batch_size * 6 + 1, seed=1), batch_size)
    return train, val


def compute_loss(model, batch):
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
