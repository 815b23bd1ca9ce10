"""lrviz.track in a plain training loop: recorded, served, steered at the exact step; never in the way."""

from __future__ import annotations

import math
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lrviz
import lrviz.staging as staging_module
from lrviz.cli import main
from lrviz.errors import ConfigError
from lrviz.live.connection import find_live
from lrviz.live.run import RemoteRun
from lrviz.staging import Staging
from lrviz.store.runs import RunStore

WAIT = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, x, y


def train_steps(run, model, opt, x, y, steps, on_step=None, scheduler=None):
    done = 0
    for i in range(steps):
        b = slice((i * 32) % 256, (i * 32) % 256 + 32)
        loss = nn.functional.mse_loss(model(x[b]), y[b])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        run.step(loss)
        done += 1
        if on_step is not None:
            on_step(i)
        if run.should_stop:
            break
    return done


def test_track_records_loss_and_the_lr_each_group_used(tmp_path):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    losses = []
    with RunStore(tmp_path / "runs.sqlite") as store:
        with lrviz.track(opt, model=model, store=store, name="plain") as run:
            train_steps(run, model, opt, x, y, 30, on_step=lambda i: losses.append(None), scheduler=sched)
        info = store.get_run(run.run_id)
        assert info.status == "finished" and info.steps == 30 and info.name == "plain"
        cols = store.load_steps(run.run_id)
    lr = cols["lr"][:, 0]
    # the rate each step *used*: 0.05 for steps 0-9, 0.025 for 10-19 (the scheduler steps after the update)
    assert np.allclose(lr[:10], 0.05) and np.allclose(lr[10:20], 0.025) and np.allclose(lr[20:], 0.0125)
    assert np.all(np.isfinite(cols["loss"])) and cols["loss"][-1] < cols["loss"][0]


def test_lrviz_steer_sets_the_lr_of_a_tracked_loop_at_the_acked_step(tmp_path, capsys):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    store_path = tmp_path / "runs.sqlite"
    steered = threading.Event()
    said = {}

    def steer_from_outside(run_id):
        assert main(["steer", str(run_id), "--lr", "0.01", "--store", str(store_path)]) == 0
        said["out"] = capsys.readouterr().out
        steered.set()

    with lrviz.track(opt, model=model, store=str(store_path)) as run:
        assert find_live(store_path, run.run_id) is not None
        t = threading.Thread(target=steer_from_outside, args=(run.run_id,))
        t.start()
        for i in range(100_000):
            loss = nn.functional.mse_loss(model(x[:32]), y[:32])
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.step(loss)
            if steered.is_set() and i > run.steps_done - 50 and run.steps_done > 0:
                # train a while after the change, then end
                if run.steps_done > int(said["out"].split("from step")[1].split()[0]) + 20:
                    break
        t.join()
    step = int(said["out"].split("from step")[1].split()[0])
    with RunStore(store_path) as store:
        lr = store.load_steps(run.run_id)["lr"][:, 0]
        events = store.load_events(run.run_id)
    assert lr[step - 1] == 0.05 and np.all(lr[step:] == 0.01)
    assert [e.step for e in events if e.kind == "set_lr"] == [step]
    assert opt.param_groups[0]["lr"] == 0.01
    assert find_live(store_path, run.run_id) is None


def test_a_paused_tracked_loop_blocks_and_a_stop_ends_it(tmp_path):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with lrviz.track(opt, store=tmp_path / "runs.sqlite") as run:
        remote = RemoteRun(run._endpoint.info).connect()
        result = {}

        def loop():
            result["steps"] = train_steps(run, model, opt, x, y, 1_000_000)

        t = threading.Thread(target=loop)
        t.start()
        paused_at = remote.pause().result(WAIT)["step"]
        time.sleep(0.05)
        assert run.steps_done == paused_at  # blocked in run.step: no step while paused
        assert run.state == "paused"
        remote.resume().result(WAIT)
        while run.steps_done < paused_at + 10:
            time.sleep(0.001)
        stop = remote.stop().result(WAIT)["step"]
        t.join(WAIT)
        assert not t.is_alive() and run.should_stop
        assert result["steps"] == stop
        remote.close()
    assert run.state == "stopped"


def test_a_torch_scheduler_works_until_lrviz_overrides_the_rate(tmp_path):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    with lrviz.track(opt, store=None) as run:
        train_steps(run, model, opt, x, y, 5, scheduler=sched)
        fut = run.set_lr(0.02)
        train_steps(run, model, opt, x, y, 5, scheduler=sched)  # the scheduler keeps stepping
        assert fut.result(WAIT)["step"] == 5
    lr = run.buffer.view()["lr"][:, 0]
    assert np.allclose(lr[:5], [0.1 * 0.9 ** k for k in range(5)])
    assert np.all(lr[5:] == 0.02)  # lrviz's rate holds against the scheduler
    assert [e.kind for e in run.events] == ["set_lr"]


def test_a_tracked_runs_rate_now_is_the_loops_own_until_lrviz_sets_one():
    """What a client is told the rate is (the state's ``lrs``): the loop's scheduler's rate, not the
    rate the loop started with (it stayed at 0.1 while the scheduler moved the optimizer's)."""
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    with lrviz.track(opt, store=None) as run:
        train_steps(run, model, opt, x, y, 3, scheduler=sched)
        assert run.lrs == [pytest.approx(0.1 * 0.5 ** 3)] == [opt.param_groups[0]["lr"]]
        fut = run.set_lr(0.02)
        train_steps(run, model, opt, x, y, 2, scheduler=sched)
        fut.result(WAIT)
        assert run.lrs == [0.02]  # lrviz's rate holds, whatever the scheduler wrote


def test_a_schedule_from_lrviz_runs_in_a_tracked_loop():
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lrviz.track(opt, store=None) as run:
        fut = run.set_schedule("StepLR:step_size=2,gamma=0.5")
        train_steps(run, model, opt, x, y, 7)  # it lands just before the first optimizer step
        assert fut.result(WAIT)["step"] == 0
    lr = run.buffer.view()["lr"][:, 0]
    assert list(lr) == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]


def test_validation_and_other_scalars_are_logged(tmp_path):
    model, x, y = problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with RunStore(tmp_path / "runs.sqlite") as store:
        with lrviz.track(opt, store=store) as run:
            train_steps(run, model, opt, x, y, 10)
            run.log(val_loss=0.5, val_accuracy=0.75)
            train_steps(run, model, opt, x, y, 10)
            run.log(val_loss=0.25, bleu=0.3)
        val = store.load_validation(run.run_id)
        scalars = store.load_scalars(run.run_id)
        assert store.get_run(run.run_id).kind == "tracked"
    assert [(p.step, p.loss, p.accuracy) for p in val] == [(9, 0.5, 0.75), (19, 0.25, None)]
    assert {k: (list(v[0]), list(v[1])) for k, v in scalars.items()} == {"bleu": ([19], [0.3])}


def test_bad_input_gets_one_clear_message_and_never_breaks_the_loop():
    model, x, y = problem()
    with pytest.raises(ConfigError, match="torch.optim.Optimizer"):
        lrviz.track(model, store=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lrviz.track(opt, store=None) as run:
            train_steps(run, model, opt, x, y, 3)
            run.step(float("nan"))
            run.step(torch.tensor(float("inf")))
            run.step(torch.ones(3))  # not a scalar
        run.step(1.0)  # after the end
        run.step(1.0)
    texts = [str(w.message) for w in caught]
    assert sum("became nan" in t for t in texts) == 1  # said once
    assert sum("scalar" in t for t in texts) == 1
    assert sum("after the run finished" in t for t in texts) == 1
    assert run.steps_done == 5
    assert [e.kind for e in run.events].count("warning") == 1


def test_an_error_inside_lrviz_is_printed_once_and_training_goes_on(capsys):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with lrviz.track(opt, store=None) as run:
        run.rates.at_step = None  # an lrviz bug, in the pre-step hook
        run.overridden = True
        n = train_steps(run, model, opt, x, y, 20)
    assert n == 20
    err = capsys.readouterr().err
    assert err.count("lrviz: warning: lrviz stopped recording") == 1
    assert run.error and "your training continues" in err


def test_track_without_a_store_serves_nothing_and_keeps_the_records():
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with lrviz.track(opt, store=None) as run:
        train_steps(run, model, opt, x, y, 12)
    assert run._endpoint is None and run.run_id is None
    assert len(run.buffer) == 12 and run.state == "finished"


def test_a_loop_nobody_watches_writes_its_rows_in_chunk_sized_blocks_and_they_are_the_same_rows(tmp_path, monkeypatch):
    # Without a store or a listener nobody reads the rows before the end: they go into the buffer a
    # chunk (4096 rows) at a time, not 64, which is what makes track cheap there. Time-based blocks off,
    # so the blocks are counted exactly.
    monkeypatch.setattr(staging_module, "FLUSH_SECONDS", math.inf)
    monkeypatch.setattr(Staging, "QUIET_SECONDS", math.inf)
    steps = Staging.QUIET_ROWS + 100

    def record(store):
        published = []
        model, x, y = problem()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=500, gamma=0.5)
        losses, lrs = [], []
        with lrviz.track(opt, store=store, listen=False) as run:
            publish = run.buffer.publish
            run.buffer.publish = lambda n: (published.append(n), publish(n))
            for i in range(steps):
                b = slice((i * 32) % 256, (i * 32) % 256 + 32)
                loss = nn.functional.mse_loss(model(x[b]), y[b])
                loss.backward()
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                opt.zero_grad()
                sched.step()
                run.step(loss)
                losses.append(loss.item())
        view = run.buffer.view()
        np.testing.assert_array_equal(view["loss"], losses)
        np.testing.assert_array_equal(view["lr"][:, 0], lrs)
        return published

    assert record(None) == [Staging.QUIET_ROWS, steps]
    with RunStore(tmp_path / "runs.sqlite") as store:  # recorded: blocks of 64, for whoever reads them live
        assert record(store)[:3] == [Staging.HOST_ROWS, 2 * Staging.HOST_ROWS, 3 * Staging.HOST_ROWS]


def test_grad_norm_true_records_the_norm_of_the_gradients_each_step_used_and_off_leaves_it_empty():
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    norms = []
    with lrviz.track(opt, store=None, grad_norm=True) as run:
        for i in range(6):
            b = slice(i * 32, i * 32 + 32)
            nn.functional.mse_loss(model(x[b]), y[b]).backward()
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
            opt.step()
            loss = nn.functional.mse_loss(model(x[b]), y[b]).detach()
            opt.zero_grad()
            run.step(loss)
    assert np.allclose(run.buffer.view()["grad_norm"], norms, rtol=1e-5)
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with lrviz.track(opt, store=None) as run:
        train_steps(run, model, opt, x, y, 3)
    assert np.isnan(run.buffer.view()["grad_norm"]).all()


def test_a_resume_acked_while_paused_is_recorded_even_when_a_stop_follows_before_the_loop_wakes():
    # The resume's ack says the run resumed; a stop queued before the paused loop wakes must not erase
    # that: the events read pause, resume, stop (found when acks began to go out at once).
    from lrviz.control import RunControl, Stopped
    from lrviz.states import Command

    control = RunControl(start_paused=True)
    said: list[str] = []
    paused = threading.Event()

    def on_pause():
        said.append("pause")
        paused.set()

    def loop():
        try:
            control.attend(lambda kind, data: None, lambda: 7, on_pause=on_pause,
                           on_resume=lambda: said.append("resume"), on_reject=lambda kind, exc: None)
        except Stopped:
            said.append("stop")

    t = threading.Thread(target=loop)
    t.start()
    assert paused.wait(WAIT)
    with control._cond:  # both queued before the loop can take either
        control.enqueue(Command.RESUME, {})
        control.enqueue(Command.STOP, {})
    t.join(WAIT)
    assert said == ["pause", "resume", "stop"]
