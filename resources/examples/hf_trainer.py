# lrviz: a plain script, not an experiment script
"""A Hugging Face ``Trainer`` run, watched and steered by lrviz: one callback added to the Trainer.

Needs transformers and accelerate (``pip install 'lrviz[transformers]'``). Trains a tiny GPT-2 built
from a config (nothing is downloaded) on synthetic token sequences, on the CPU, for a few minutes::

    python -m lrviz.resources.examples.hf_trainer

While it trains, the app's run browser lists it as live (Watch), and ``lrviz steer RUN --lr 1e-3``
(``--pause``, ``--resume``, ``--stop``) reaches the trainer's optimizer before its next update.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from lrviz.integrations.transformers import LrvizCallback


class Motifs(torch.utils.data.Dataset):
    """Sequences of 32 tokens made of a few repeated motifs: something a tiny model can learn."""

    def __init__(self, n: int, seed: int, vocab: int = 64, length: int = 32):
        g = torch.Generator().manual_seed(seed)
        motifs = torch.randint(0, vocab, (8, 4), generator=torch.Generator().manual_seed(1234))
        pick = torch.randint(0, 8, (n, length // 4), generator=g)
        self.ids = motifs[pick].reshape(n, length)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> LrvizCallback:
    parser = argparse.ArgumentParser(description="A Hugging Face Trainer with lrviz's callback.")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--store", default=None, help="the run store (default: lrviz's own)")
    args = parser.parse_args(argv)

    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    callback = LrvizCallback(name="tiny gpt-2", **({} if args.store is None else {"store": args.store}))
    with tempfile.TemporaryDirectory(prefix="lrviz-hf-") as out:
        settings = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
            warmup_steps=args.steps // 20, per_device_train_batch_size=16, logging_steps=1, eval_strategy="steps",
            eval_steps=max(1, args.steps // 25), report_to="none", save_strategy="no", use_cpu=True,
            disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=settings, train_dataset=Motifs(4096, seed=0),
                                       eval_dataset=Motifs(128, seed=1), callbacks=[callback])
        trainer.remove_callback(transformers.PrinterCallback)  # lrviz records the logs; no dict per step
        trainer.train()
    run = callback.run
    print(f"lrviz: run {run.run_id} {run.state} after {run.steps_done} steps", flush=True)
    return callback


if __name__ == "__main__":
    main()
