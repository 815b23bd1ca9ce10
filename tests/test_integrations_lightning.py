"""LrvizCallback on a real Lightning Trainer (a tiny module on random data, on the CPU): what it stores
equals what the trainer logged at the same steps, and steering reaches the trainer's optimizer."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra: pip install 'lrviz[lightning]'")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from stored_runs import run_plain_example  # noqa: E402

from lrviz.errors import ConfigError  # noqa: E402
from lrviz.integrations.lightning import LrvizCallback  # noqa: E402
from lrviz.live.run import RemoteRun  # noqa: E402
from lrviz.store.runs import RunStore  # noqa: E402

WAIT = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Regression(L.LightningModule):
    """Two param groups (body and head at a tenth of the rate), a StepLR stepped every update."""

    def __init__(self, lr: float = 0.05, step_size: int = 4):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.micro_losses: list[float] = []  # every training_step's loss, as computed

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.body(x)), y)
        self.micro_losses.append(loss.item())
        self.log("train_loss", loss)
        self.log("half_loss", loss / 2)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.head(self.body(x))
        self.log("val_loss", nn.functional.mse_loss(out, y))
        self.log("val_acc", ((out - y).abs() < 0.5).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": self.body.parameters()},
                               {"params": self.head.parameters(), "lr": self.hparams.lr / 10}],
                              lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.hparams.step_size, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loaders(n=128, batch=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=batch), DataLoader(data, batch_size=64)


def trainer(tmp_path, callback, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(tmp_path / "logs", name="t"),
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     num_sanity_val_steps=0, callbacks=[callback], **kw)


def logged(tmp_path) -> list[dict[str, str]]:
    (path,) = Path(tmp_path / "logs").rglob("metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_stored_run_is_what_the_trainer_logged(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(name="regression", store=store_path)
    model = Regression()
    train, val = loaders()
    t = trainer(tmp_path, cb, max_epochs=2, log_every_n_steps=1)
    t.fit(model, train, val)
    rows = logged(tmp_path)
    with RunStore(store_path) as store:
        info = store.get_run(cb.run.run_id)
        cols = store.load_steps(cb.run.run_id)
        points = store.load_validation(cb.run.run_id)
        extra = store.load_scalars(cb.run.run_id)
    assert info.status == "finished" and info.name == "regression" and info.steps == t.global_step == 16
    assert info.config["trainer"] == "lightning" and info.config["hparams"]["lr"] == 0.05
    # the loss of every step: the value the trainer's logger wrote at that step
    train_rows = {int(r["step"]): float(r["train_loss"]) for r in rows if r["train_loss"]}
    assert sorted(train_rows) == list(cols["step"]) == list(range(16))
    assert np.allclose(cols["loss"], [train_rows[s] for s in cols["step"]], rtol=1e-6, atol=0)
    # the rate each group used: StepLR halves both every 4 updates; the head runs at a tenth
    expect = np.array([0.05 * 0.5 ** (s // 4) for s in range(16)])
    assert np.allclose(cols["lr"][:, 0], expect) and np.allclose(cols["lr"][:, 1], expect / 10)
    # validation at the step the trainer logged it, with its accuracy
    val_rows = [(int(r["step"]), float(r["val_loss"]), float(r["val_acc"])) for r in rows if r["val_loss"]]
    assert [p.step for p in points] == [r[0] for r in val_rows] == [7, 15]
    assert np.allclose([(p.loss, p.accuracy) for p in points], [r[1:] for r in val_rows], rtol=1e-6, atol=0)
    # anything else logged: an extra scalar series, at the steps it was logged
    steps, values = extra["half_loss"]
    assert list(steps) == list(range(16)) and np.allclose(values, np.asarray(cols["loss"]) / 2, rtol=1e-6)


def test_accumulated_updates_record_the_mean_of_their_micro_batches(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(store=store_path)
    model = Regression(step_size=2)
    train, val = loaders(n=112)  # 7 batches an epoch: the last update of each epoch has 1 micro-batch
    t = trainer(tmp_path, cb, max_epochs=2, accumulate_grad_batches=3, log_every_n_steps=1,
                limit_val_batches=0)
    t.fit(model, train)
    with RunStore(store_path) as store:
        cols = store.load_steps(cb.run.run_id)
    micro = model.micro_losses
    groups = [micro[0:3], micro[3:6], micro[6:7], micro[7:10], micro[10:13], micro[13:14]]
    assert t.global_step == len(cols["step"]) == 6
    assert np.allclose(cols["loss"], [np.mean(g) for g in groups], rtol=1e-6, atol=0)
    assert np.allclose(cols["lr"][:, 0], [0.05 * 0.5 ** (s // 2) for s in range(6)])
    assert list(cols["epoch"]) == [0, 0, 0, 1, 1, 1]


def test_a_steered_rate_reaches_the_trainers_optimizer_and_a_stop_ends_fit(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(store=store_path)
    model = Regression(step_size=3)
    train, val = loaders()
    t = trainer(tmp_path, cb, max_epochs=1000, log_every_n_steps=1, limit_val_batches=0)
    acks: dict[str, int] = {}
    failures: list[BaseException] = []

    def steer():
        try:
            while cb.run is None or cb.run._endpoint is None or cb.run.steps_done < 5:
                time.sleep(0.001)
            remote = RemoteRun(cb.run._endpoint.info).connect()
            acks["lr"] = remote.set_lr(0.02).result(WAIT)["step"]
            while cb.run.steps_done < acks["lr"] + 10:
                time.sleep(0.001)
            paused = remote.pause().result(WAIT)["step"]
            time.sleep(0.05)
            acks["paused_steps"] = cb.run.steps_done - paused  # 0: no step while paused
            remote.resume().result(WAIT)
            acks["stop"] = remote.stop().result(WAIT)["step"]
            remote.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
            cb.run.stop()

    thread = threading.Thread(target=steer)
    thread.start()
    t.fit(model, train)
    thread.join(WAIT)
    assert not failures, failures
    step = acks["lr"]
    assert acks["paused_steps"] == 0
    # stop: the trainer ends with the step the stop was acked before
    assert t.global_step == acks["stop"] and t.should_stop and t.current_epoch < 999
    with RunStore(store_path) as store:
        info = store.get_run(cb.run.run_id)
        cols = store.load_steps(cb.run.run_id)
        events = store.load_events(cb.run.run_id)
    assert info.status == "stopped" and info.steps == acks["stop"]
    lr = cols["lr"]
    before = [0.05 * 0.5 ** (s // 3) for s in range(step)]
    assert np.allclose(lr[:step, 0], before)
    # from the acked step on, lrviz's rate holds against the module's StepLR (which kept stepping)
    assert np.all(lr[step:, 0] == 0.02)
    assert np.allclose(lr[step:, 1], 0.02 * lr[step - 1, 1] / lr[step - 1, 0])  # the groups keep their ratio
    opt = t.optimizers[0]
    assert opt.param_groups[0]["lr"] == 0.02
    assert [e.step for e in events if e.kind == "set_lr"] == [step]
    assert [e.kind for e in events if e.kind in ("pause", "resume", "stop")] == ["pause", "resume", "stop"]


def test_a_run_started_from_a_checkpoint_counts_on_from_its_global_step(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    first = trainer(tmp_path, LrvizCallback(store=store_path), max_epochs=1, log_every_n_steps=1,
                    limit_val_batches=0)
    first.fit(Regression(), loaders()[0])
    ckpt = tmp_path / "first.ckpt"
    first.save_checkpoint(ckpt)
    cb = LrvizCallback(store=store_path)
    second = trainer(tmp_path, cb, max_epochs=2, log_every_n_steps=1, limit_val_batches=0)
    second.fit(Regression(), loaders()[0], ckpt_path=ckpt)
    with RunStore(store_path) as store:
        cols = store.load_steps(cb.run.run_id)
    assert list(cols["step"]) == list(range(8, 16))
    assert list(cols["epoch"]) == [1] * 8
    assert np.allclose(cols["lr"][:, 0], [0.05 * 0.5 ** (s // 4) for s in range(8, 16)])


def test_a_module_that_raises_leaves_a_failed_run(tmp_path):
    class Broken(Regression):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise ValueError("bad batch")
            return super().training_step(batch, batch_idx)

    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(store=store_path)
    with pytest.raises(ValueError, match="bad batch"):
        trainer(tmp_path, cb, max_epochs=1, limit_val_batches=0).fit(Broken(), loaders()[0])
    with RunStore(store_path) as store:
        info = store.get_run(cb.run.run_id)
    assert info.status == "failed" and info.steps == 3 and "bad batch" in (info.error or "")


def test_manual_optimization_with_two_optimizers_records_both(tmp_path):
    class TwoOptimizers(Regression):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            body, head = self.optimizers()
            x, y = batch
            loss = nn.functional.mse_loss(self.head(self.body(x)), y)
            self.manual_backward(loss)
            body.step()
            head.step()
            body.zero_grad()
            head.zero_grad()
            return loss

        def configure_optimizers(self):
            return (torch.optim.SGD(self.body.parameters(), lr=0.05),
                    torch.optim.Adam(self.head.parameters(), lr=0.001))

    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(store=store_path)
    t = trainer(tmp_path, cb, max_epochs=1, limit_val_batches=0)
    t.fit(TwoOptimizers(), loaders()[0])
    with RunStore(store_path) as store:
        cols = store.load_steps(cb.run.run_id)
        info = store.get_run(cb.run.run_id)
    assert info.config["optimizer"] == "SGD+Adam"
    assert len(cols["step"]) == 8 and t.global_step == 16  # a row per batch; Lightning counts both steps
    assert np.allclose(cols["lr"], [0.05, 0.001]) and np.all(np.isfinite(cols["loss"]))


def test_validation_logged_under_another_name_is_found_when_named(tmp_path):
    class Scored(Regression):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("score", nn.functional.mse_loss(self.head(self.body(x)), y))

    store_path = tmp_path / "runs.sqlite"
    cb = LrvizCallback(store=store_path, val_loss="score")
    t = trainer(tmp_path, cb, max_epochs=1, log_every_n_steps=1)
    t.fit(Scored(), *loaders())
    rows = [r for r in logged(tmp_path) if r.get("score")]
    with RunStore(store_path) as store:
        points = store.load_validation(cb.run.run_id)
    assert [(p.step, p.loss) for p in points] == [(int(r["step"]), pytest.approx(float(r["score"]))) for r in rows]
    assert len(points) == 1 and points[0].accuracy is None


def test_under_several_processes_rank_0_records_a_watch_only_run(tmp_path):
    from types import SimpleNamespace

    model = Regression()
    opt = model.configure_optimizers()["optimizer"]
    fake = dict(optimizers=[opt], estimated_stepping_batches=10, world_size=2, global_step=0, callback_metrics={},
                max_epochs=1, max_steps=-1, accumulate_grad_batches=1, precision="32-true")
    other = LrvizCallback(store=tmp_path / "runs.sqlite")
    other.on_train_start(SimpleNamespace(global_rank=1, **fake), model)
    assert other.run is None  # only rank 0 records
    cb = LrvizCallback(store=None)
    cb.on_train_start(SimpleNamespace(global_rank=0, **fake), model)
    with pytest.raises(ConfigError, match="watched, not steered: it trains in 2 processes"):
        cb.run.set_lr(0.1).result(WAIT)
    cb.on_train_end(None, model)
    assert cb.run.state == "finished"


def test_the_lightning_example_is_a_plain_script_that_records_its_fit(tmp_path):
    info, cols, _val = run_plain_example("lightning_loop", ["--epochs", "1"], tmp_path / "runs.sqlite")
    assert info.status == "finished" and info.kind == "tracked" and info.steps == 32
    assert cols["lr"].shape == (32, 2) and np.allclose(cols["lr"][0], [0.05, 0.005])  # body and head
