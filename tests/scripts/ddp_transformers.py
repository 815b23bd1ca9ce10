"""A Hugging Face ``Trainer`` on 2 CPU processes (DDP, gloo through accelerate), recorded with
LrvizCallback, for the torchrun tests.

Run with torchrun; argv: STORE STEPS. Each rank writes the rates its optimizer used to
``STORE.rank{R}.lrs`` (to check that a steered rate landed at the same step on both).
"""

import sys

import torch
import transformers

from lrviz.integrations.transformers import LrvizCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=256, length=16, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Used(transformers.TrainerCallback):
    """Each update's rate, as the optimizer holds it when it steps (after lrviz's steering)."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def main() -> None:
    store, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    args = transformers.TrainingArguments(
        output_dir=store + ".out", per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, max_steps=steps, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, ddp_backend="gloo")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64,
                                                                 n_positions=32))
    used = Used()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[LrvizCallback(name="ddp hf", store=store, quiet=True), used])
    trainer.train()
    with open(f"{store}.rank{args.process_index}.lrs", "w") as f:
        f.write("\n".join(repr(v) for v in used.lrs))


if __name__ == "__main__":
    main()
