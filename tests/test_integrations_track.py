"""What the trainer callbacks need from lrviz.track (no trainer package needed): several optimizers,
a run that starts at a trainer's global step, steps whose loss was not logged, extra scalars in the
store, and a watch-only run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lrviz
from lrviz.errors import ConfigError
from lrviz.staging import Staging
from lrviz.store.runs import RunStore

WAIT = 60


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), x, y


def one_step(model, opts, x, y):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    for opt in opts:
        opt.step()
        opt.zero_grad()
    return loss


def test_two_optimizers_are_recorded_and_steered_as_one_run():
    model, x, y = problem()
    body = torch.optim.SGD(model[0].parameters(), lr=0.1)
    head = torch.optim.Adam(model[2].parameters(), lr=0.01)
    with lrviz.track([body, head], store=None) as run:
        for _ in range(3):
            run.step(one_step(model, [body, head], x, y))
        fut = run.set_lr(0.05)  # groups keep their ratio: the head gets a tenth
        for _ in range(3):
            run.step(one_step(model, [body, head], x, y))
    assert fut.result(WAIT)["step"] == 3
    lr = run.buffer.view()["lr"]
    assert lr.shape == (6, 2)
    assert np.allclose(lr[:3], [0.1, 0.01]) and np.allclose(lr[3:], [0.05, 0.005])
    assert body.param_groups[0]["lr"] == 0.05 and head.param_groups[0]["lr"] == pytest.approx(0.005)
    assert run._config()["optimizer"] == "SGD+Adam"
    with pytest.raises(ConfigError, match="Optimizer"):
        lrviz.track([body, model], store=None)


def test_a_run_can_start_at_a_trainers_global_step(tmp_path):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with RunStore(tmp_path / "runs.sqlite") as store:
        with lrviz.track(opt, store=store, first_step=100) as run:
            for _ in range(2):
                run.step(one_step(model, [opt], x, y))
            fut = run.set_lr(0.02)
            for _ in range(2):
                run.step(one_step(model, [opt], x, y))
            run.log(val_loss=0.5)
        cols = store.load_steps(run.run_id)
        val = store.load_validation(run.run_id)
    assert list(cols["step"]) == [100, 101, 102, 103]
    assert fut.result(WAIT)["step"] == 102 and list(cols["lr"][:, 0]) == [0.1, 0.1, 0.02, 0.02]
    assert [p.step for p in val] == [103]


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "staged"])
def test_a_step_without_a_loss_is_recorded_as_not_measured_without_a_warning(on_device):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with lrviz.track(opt, store=None) as run:
            if on_device:  # the path a GPU run takes, on the CPU: losses staged, checked at each flush
                run._staging = Staging(run.buffer, torch.device("cpu"), on_host=False)
                run._fast = False
            losses = []
            for i in range(6):
                loss = one_step(model, [opt], x, y)
                losses.append(loss.item())
                run.step(loss if i % 3 == 2 else None)  # a trainer that logs every third step
    cols = run.buffer.view()
    assert np.array_equal(np.isnan(cols["loss"]), [True, True, False, True, True, False])
    assert cols["loss"][2] == pytest.approx(losses[2]) and cols["loss"][5] == pytest.approx(losses[5])
    assert not run.events
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lrviz.track(opt, store=None) as run:
            run.step(one_step(model, [opt], x, y))
            run.step(None)
            run.step(torch.tensor(float("nan")))  # a NaN loss that was measured is still a warning
    assert sum("became nan" in str(w.message) for w in caught) == 1
    assert run.summary()["final_loss"] != run.summary()["final_loss"]  # NaN: the last step measured NaN


def test_the_final_loss_of_a_run_whose_last_steps_were_not_logged_is_the_last_logged():
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lrviz.track(opt, store=None) as run:
        run.step(one_step(model, [opt], x, y))
        run.step(torch.tensor(0.25))
        run.step(None)
    assert run.steps_done == 3 and run.error is None and np.isnan(run.buffer.view()["loss"][-1])
    assert run.summary()["final_loss"] == 0.25


def test_extra_scalars_are_stored_with_the_run(tmp_path):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with RunStore(tmp_path / "runs.sqlite") as store:
        with lrviz.track(opt, store=store) as run:
            for i in range(4):
                run.step(one_step(model, [opt], x, y))
                run.log(grad_scale=2.0 ** i)
            run.log(step=1, late=7.0)
        got = store.load_scalars(run.run_id, times=True)
    steps, values, times = got["grad_scale"]
    assert list(steps) == [0, 1, 2, 3] and list(values) == [1.0, 2.0, 4.0, 8.0]
    assert np.all(np.diff(times) >= 0) and times[-1] < 60  # seconds of the run, not of the epoch
    assert [list(a) for a in got["late"][:2]] == [[1], [7.0]]


def test_a_watch_only_run_refuses_every_command_with_its_reason():
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lrviz.track(opt, store=None, read_only="it trains in 2 processes") as run:
        futures = [run.set_lr(0.01), run.pause(), run.stop()]
        for _ in range(3):
            run.step(one_step(model, [opt], x, y))
    for fut in futures:
        with pytest.raises(ConfigError, match="watched, not steered: it trains in 2 processes"):
            fut.result(WAIT)
    assert run.state == "finished" and np.all(run.buffer.view()["lr"][:, 0] == 0.1)


def test_the_lab_commands_that_need_lrvizs_runner_are_refused_with_the_reason():
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lrviz.track(opt, store=None) as run:
        futures = [run.submit(kind) for kind in ("range_test", "rollback", "checkpoint")]
        run.step(one_step(model, [opt], x, y))
    for fut in futures:
        with pytest.raises(ConfigError, match=r"needs lrviz's own runner \(`lrviz run`\)"):
            fut.result(WAIT)
