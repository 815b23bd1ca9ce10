"""LrvizCallback on a real Hugging Face Trainer (a one-layer GPT-2 built from a config, random token
ids, the CPU, no downloads): the stored run is what the trainer logged at the same steps, and
steering with `lrviz steer` reaches the trainer's optimizer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is an optional extra: pip install 'lrviz[transformers]'")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate: pip install 'lrviz[transformers]'")

from stored_runs import run_plain_example  # noqa: E402

from lrviz.cli import main  # noqa: E402
from lrviz.errors import ConfigError  # noqa: E402
from lrviz.integrations.transformers import LrvizCallback  # noqa: E402
from lrviz.store.runs import RunStore  # noqa: E402

WAIT = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def make_trainer(tmp_path, callback, **kw):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-2,
                    lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, max_steps=12,
                    report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                    dataloader_num_workers=0, seed=0)
    settings.update(kw)
    args = transformers.TrainingArguments(**settings)
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(), eval_dataset=Tokens(n=16, seed=1),
                                callbacks=[callback])


def logged(trainer, key):
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


@pytest.mark.slow
def test_the_stored_run_is_what_the_trainer_logged(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(store=store_path)
    trainer = make_trainer(tmp_path, cb, eval_strategy="steps", eval_steps=4)
    trainer.train()
    with RunStore(store_path) as store:
        info = store.get_run(cb.run.run_id)
        cols = store.load_steps(cb.run.run_id)
        points = store.load_validation(cb.run.run_id)
        extra = store.load_scalars(cb.run.run_id)
    assert info.status == "finished" and info.name == "GPT2LMHeadModel" and info.config["trainer"] == "transformers"
    assert info.steps == trainer.state.global_step == 12
    # the trainer's step g is lrviz's step g - 1 (updates counted from 0)
    loss = logged(trainer, "loss")
    assert sorted(loss) == list(range(1, 13))
    assert list(cols["loss"]) == [loss[s + 1] for s in cols["step"]]
    # the rate each update used is the one the trainer logged for it (warmup, then linear decay)
    lr = logged(trainer, "learning_rate")
    assert list(cols["lr"][:, 0]) == pytest.approx([lr[s + 1] for s in cols["step"]], rel=1e-12)
    assert cols["lr"][0, 0] < cols["lr"][1, 0] and cols["lr"][-1, 0] < cols["lr"][2, 0]
    evals = logged(trainer, "eval_loss")
    assert [(p.step, p.loss) for p in points] == [(s - 1, evals[s]) for s in sorted(evals)]
    assert [p.step for p in points] == [3, 7, 11]
    # every other number logged: an extra series at its step
    norms = logged(trainer, "grad_norm")
    steps, values = extra["grad_norm"]
    assert list(steps) == [s - 1 for s in sorted(norms)] and list(values) == [norms[s] for s in sorted(norms)]


def test_steps_between_logs_are_recorded_as_not_measured(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(store=store_path)
    trainer = make_trainer(tmp_path, cb, logging_steps=5)
    trainer.train()
    with RunStore(store_path) as store:
        cols = store.load_steps(cb.run.run_id)
        info = store.get_run(cb.run.run_id)
    loss = logged(trainer, "loss")
    assert sorted(loss) == [5, 10]
    assert list(cols["step"]) == list(range(12))
    measured = np.flatnonzero(np.isfinite(cols["loss"]))
    assert list(measured) == [4, 9] and list(cols["loss"][measured]) == [loss[5], loss[10]]
    assert not [e for e in cb.run.events if e.kind == "warning"]  # not-logged is not a NaN loss
    assert info.final_loss == loss[10] and info.summary["final_loss"] == loss[10]


def test_lrviz_steer_reaches_the_trainers_optimizer_and_a_stop_ends_training(tmp_path, capsys):
    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(store=store_path)
    trainer = make_trainer(tmp_path, cb, max_steps=100_000, logging_steps=2)
    said: dict[str, str] = {}
    failures: list[BaseException] = []

    def steer(*argv):
        assert main(["steer", str(cb.run.run_id), *argv, "--store", str(store_path)]) == 0
        out = capsys.readouterr().out
        return int(out.split("from step")[1].split()[0]) if "from step" in out else out

    def outside():
        try:
            while cb.run is None or cb.run._endpoint is None or cb.run.steps_done < 5:
                time.sleep(0.001)
            said["lr"] = steer("--lr", "0.003")
            while cb.run.steps_done < said["lr"] + 6:
                time.sleep(0.001)
            said["stop"] = steer("--stop")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
            cb.run.stop()

    thread = threading.Thread(target=outside)
    thread.start()
    trainer.train()
    thread.join(WAIT)
    assert not failures, failures
    step = said["lr"]
    with RunStore(store_path) as store:
        info = store.get_run(cb.run.run_id)
        cols = store.load_steps(cb.run.run_id)
        events = store.load_events(cb.run.run_id)
    assert info.status == "stopped" and trainer.state.global_step == info.steps < 100_000
    lr = cols["lr"][:, 0]
    assert lr[step - 1] != 0.003 and np.all(lr[step:] == 0.003)  # holds against the linear schedule
    assert trainer.optimizer.param_groups[0]["lr"] == 0.003
    assert [e.step for e in events if e.kind == "set_lr"] == [step]
    # (the trainer's own "learning_rate" log shows its scheduler's value, get_last_lr(), not the rate used)


def test_under_several_processes_the_main_process_records_a_watch_only_run(tmp_path):
    from types import SimpleNamespace

    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = SimpleNamespace(world_size=2)
    control = transformers.TrainerControl()
    other = LrvizCallback(store=tmp_path / "runs.sqlite")
    other.on_train_begin(args, SimpleNamespace(is_world_process_zero=False, global_step=0, max_steps=10), control,
                         model=model, optimizer=opt)
    assert other.run is None
    cb = LrvizCallback(store=None)
    cb.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=10), control,
                      model=model, optimizer=opt)
    with pytest.raises(ConfigError, match="watched, not steered: it trains in 2 processes"):
        cb.run.stop().result(WAIT)
    cb.on_train_end(args, None, control)
    assert cb.run.state == "finished" and not control.should_training_stop


def test_the_trainer_example_is_a_plain_script_that_records_its_run(tmp_path):
    info, cols, val = run_plain_example("hf_trainer", ["--steps", "6"], tmp_path / "runs.sqlite")
    assert info.status == "finished" and info.kind == "tracked" and info.steps == 6
    assert np.all(np.isfinite(cols["loss"])) and len(val) == 6  # eval every step at 6 steps
