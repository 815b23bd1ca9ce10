"""The LR range test: exact restore of model/optimizer/RNG, early stop, suggestions, headless find_lr."""

from __future__ import annotations

import copy
import csv
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lrviz.config import RunConfig
from lrviz.errors import ConfigError, ScriptError
from lrviz.experiment import load_experiment
from lrviz.lab.rangetest import (
    METHODS,
    MIN_POINTS,
    TRIM_END,
    RangeTestProgress,
    RangeTestResult,
    Suggestions,
    candidates,
    confirm_cost,
    confirm_rates,
    find_lr,
    held_out,
    min_steps,
    range_test,
    smooth,
    suggest,
    valley_index,
    write_csv,
)

CORPUS = Path(__file__).parent / "corpus"


# --------------------------------------------------------------------------- a small stateful problem


class Net(nn.Module):
    """Parameters, BatchNorm buffers, a non-persistent buffer, dropout (RNG) and a frozen eval() part."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 1)
        self.head = nn.Sequential(nn.Linear(1, 1), nn.Dropout(0.5))
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x))))))


def make_batches(n: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n * size, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * torch.randn(n * size, 1, generator=g)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n * size, size)]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    # Draw from every host RNG, so that a missing restore shows.
    noise = 1e-3 * (random.random() + float(np.random.rand()))
    return nn.functional.mse_loss(model(x), y) + noise


def make_problem(optimizer: str = "sgd", warm_steps: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    model.head.eval()  # a part left in eval mode by the user: must come back in eval mode
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    elif optimizer == "adam":
        opt = torch.optim.Adam([{"params": [p for n, p in model.named_parameters() if "fc1" in n], "lr": 3e-3},
                                {"params": [p for n, p in model.named_parameters() if "fc1" not in n]}],
                               lr=1e-3, weight_decay=1e-4)
    else:
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.5)
    batches = make_batches()
    for i in range(warm_steps):
        opt.zero_grad()
        loss_of(model, batches[i % len(batches)]).backward()
        opt.step()
    # Leave the last gradients in place: they are part of the state to restore.
    opt.zero_grad(set_to_none=False)
    loss_of(model, batches[0]).backward()
    return model, opt, batches


def capture(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """An independent deep record of everything the range test must leave as it was."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "state": {id(p): copy.deepcopy(s) for p, s in opt.state.items()},
        "groups": [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
        "group_params": [[id(p) for p in g["params"]] for g in opt.param_groups],
        "modes": [m.training for m in model.modules()],
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state().clone(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def assert_same_tensor_dict(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), k
        else:
            assert x == y, k


def assert_unchanged(before: dict, after: dict) -> None:
    for name in ("params", "buffers"):
        assert before[name].keys() == after[name].keys()
        for k in before[name]:
            assert torch.equal(before[name][k], after[name][k]), f"{name} {k} changed"
    for k, g in before["grads"].items():
        if g is None:
            assert after["grads"][k] is None, k
        else:
            assert torch.equal(g, after["grads"][k]), f"grad {k} changed"
    assert before["param_ids"] == after["param_ids"]
    assert before["grad_ids"] == after["grad_ids"], "gradient tensors were replaced"
    assert before["state"].keys() == after["state"].keys()
    for pid in before["state"]:
        assert_same_tensor_dict(before["state"][pid], after["state"][pid])
    assert before["groups"] == after["groups"]  # lr, momentum, betas, weight_decay, ...
    assert before["group_params"] == after["group_params"]
    assert before["modes"] == after["modes"]
    assert before["py_rng"] == after["py_rng"]
    b, a = before["np_rng"], after["np_rng"]
    assert b[0] == a[0] and np.array_equal(b[1], a[1]) and b[2:] == a[2:]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    if before["cuda_rng"] is not None:
        assert all(torch.equal(x, y) for x, y in zip(before["cuda_rng"], after["cuda_rng"]))


# --------------------------------------------------------------------------- restore


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_full_sweep_restores_everything_bit_exactly(optimizer):
    model, opt, batches = make_problem(optimizer)
    before = capture(model, opt)
    r = range_test(model, opt, batches, loss_of, start=1e-5, end=1e-2, steps=30)
    assert not r.stopped_early and r.stop_reason == ""
    assert len(r) == 30 and len(r.losses) == len(r.smoothed) == 30
    assert np.all(np.isfinite(r.losses))
    assert_unchanged(before, capture(model, opt))


def test_sweep_trains_and_sets_every_group_lr():
    model, opt, batches = make_problem("adam")
    seen = []

    def spy(m, batch):
        seen.append([g["lr"] for g in opt.param_groups])
        assert m.training and all(sub.training for sub in m.modules())  # train mode during the test
        return loss_of(m, batch)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = []
    r = range_test(model, opt, batches, spy, start=1e-4, end=1e-1, steps=10,
                   on_step=lambda i, lr, loss: moved.append(
                       (i, lr, loss, any(not torch.equal(before[n], p) for n, p in model.named_parameters()))))
    expected = 1e-4 * (1e-1 / 1e-4) ** (np.arange(10) / 9)
    np.testing.assert_allclose(r.lrs, expected, rtol=1e-12)
    assert [lrs for lrs in seen] == [[lr, lr] for lr in r.lrs.tolist()]
    assert [m[:3] for m in moved] == list(zip(range(10), r.lrs.tolist(), r.losses.tolist()))
    assert moved[-1][3], "the optimizer never stepped during the sweep"
    # 10 steps over 4 batches: the data restarted twice
    np.testing.assert_allclose(r.smoothed, smooth(r.losses, 0.98))


def test_restores_after_divergence():
    model, opt, batches = make_problem("sgd")
    before = capture(model, opt)
    r = range_test(model, opt, batches, loss_of, start=1e-3, end=1e6, steps=60)
    assert r.stopped_early
    assert ("exceeded 4x" in r.stop_reason) or ("became" in r.stop_reason)
    assert len(r) < 60
    assert_unchanged(before, capture(model, opt))


def stop_after(n: int):
    """A ``should_stop`` that says stop from its (n+1)-th call on."""
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > n

    return should_stop


def test_restores_after_cancel_midway():
    model, opt, batches = make_problem("adam")
    before = capture(model, opt)
    r = range_test(model, opt, batches, loss_of, start=1e-5, end=1.0, steps=50, should_stop=stop_after(7))
    assert len(r) == 7 and r.stopped_early
    assert r.stop_reason == "cancelled after 7 of 50 steps"
    assert r.suggestions.best is None and "cancelled" in r.suggestions.reason
    assert_unchanged(before, capture(model, opt))


def test_restores_when_the_loss_function_raises():
    model, opt, batches = make_problem("sgd")
    before = capture(model, opt)
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("boom in the user's loss")
        return loss_of(m, batch)

    with pytest.raises(RuntimeError, match="boom in the user's loss"):
        range_test(model, opt, batches, failing, steps=20)
    assert_unchanged(before, capture(model, opt))


def test_restores_a_fresh_optimizer_without_state():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(3)]
    before = capture(model, opt)
    assert not opt.state and all(p.grad is None for p in model.parameters())
    range_test(model, opt, batches, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), steps=12)
    assert not opt.state, "momentum buffers created by the sweep were left behind"
    assert_unchanged(before, capture(model, opt))


@pytest.mark.parametrize("optimizer, confirm", [("sgd", False), ("adam", True)])
def test_training_after_a_range_test_is_the_same_as_without_one(optimizer, confirm):
    """Mid-training use: the trajectory afterwards is bit-identical (weights, momentum, dropout RNG),
    also after a confirmation (which restores the same snapshot once per rate tried)."""

    def train(model, opt, batches, n):
        for i in range(n):
            opt.zero_grad()
            loss_of(model, batches[i % len(batches)]).backward()
            opt.step()
        return {k: v.clone() for k, v in model.state_dict().items()}

    random.seed(1)
    np.random.seed(1)
    model, opt, batches = make_problem(optimizer)
    plain = train(model, opt, batches, 5)

    random.seed(1)
    np.random.seed(1)
    model, opt, batches = make_problem(optimizer)
    r = range_test(model, opt, batches, loss_of, start=1e-4, end=1.0, steps=100, confirm=confirm, confirm_steps=5)
    assert (r.confirmation is not None) == confirm
    after = train(model, opt, batches, 5)
    assert_same_tensor_dict(plain, after)


# --------------------------------------------------------------------------- early stop


def scripted_losses(values):
    """A model + loss_of whose loss at step i is values[i] (a differentiable constant)."""
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    it = iter(values)

    def loss(m, batch):
        return m.weight.sum() * 0 + next(it)

    return model, opt, [(torch.zeros(1, 1), torch.zeros(1, 1))], loss


def test_stops_when_smoothed_loss_exceeds_four_times_its_best():
    values = [1.0] * 20 + [0.5] * 10 + [40.0] * 70
    model, opt, batches, loss = scripted_losses(values)
    r = range_test(model, opt, batches, loss, start=1e-6, end=1.0, steps=100)
    # Where it must stop, computed here independently: the first smoothed value above 4x the best before it.
    sm = smooth(values, 0.98)
    best = np.minimum.accumulate(sm)
    first = next(i for i in range(1, 100) if sm[i] > 4 * best[i - 1])
    assert r.stopped_early and len(r) == first + 1
    assert r.stop_reason == f"smoothed loss exceeded 4x its best at lr {r.lrs[-1]:.3g}"
    np.testing.assert_array_equal(r.losses, values[:first + 1])
    np.testing.assert_allclose(r.smoothed, sm[:first + 1])
    # a larger factor lets it run longer
    model, opt, batches, loss = scripted_losses(values)
    r8 = range_test(model, opt, batches, loss, start=1e-6, end=1.0, steps=100, stop_factor=8)
    assert len(r8) > len(r)


def test_non_finite_loss_stops_and_is_not_stepped():
    values = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, float("nan"), 0.1, 0.1]
    model, opt, batches, loss = scripted_losses(values)
    w = model.weight.detach().clone()
    r = range_test(model, opt, batches, loss, steps=100)
    assert len(r) == 7 and r.stopped_early
    assert r.stop_reason.startswith("the loss became nan at lr ")
    assert math.isnan(r.losses[-1]) and math.isnan(r.smoothed[-1])
    s = r.suggestions
    assert s.steepest is s.valley is s.minimum_tenth is s.best is None
    assert s.band() is None
    assert s.reason.startswith("the loss diverged after only 7 steps") and "lower --start" in s.reason
    assert torch.equal(model.weight, w)


def test_nan_from_the_first_step_gives_no_suggestion():
    model, opt, batches, loss = scripted_losses([float("nan")] * 5)
    r = range_test(model, opt, batches, loss, steps=10)
    assert len(r) == 1 and r.suggestions.best is None
    assert r.suggestions.reason.startswith("no finite losses")


def test_negative_losses_stop_on_a_rise_of_three_times_the_best_magnitude():
    # A log-likelihood style loss below zero: "4x its best" means rising by 3x |best|.
    values = list(-1.0 - np.linspace(0, 1, 30)) + [-1.9] * 10
    model, opt, batches, loss = scripted_losses(values)
    r = range_test(model, opt, batches, loss, steps=40)
    assert not r.stopped_early and len(r) == 40
    values = list(-1.0 - np.linspace(0, 1, 30)) + [50.0] * 70
    model, opt, batches, loss = scripted_losses(values)
    r = range_test(model, opt, batches, loss, steps=100)
    sm = smooth(values, 0.98)
    best = np.minimum.accumulate(sm)
    first = next(i for i in range(1, 100) if sm[i] > best[i - 1] + 3 * abs(best[i - 1]))
    assert r.stopped_early and len(r) == first + 1 and best[first] < 0


# --------------------------------------------------------------------------- suggestions


def u_curve(n: int = 100):
    """Flat, then a descent over 1e-4..1e-1, a minimum, then a blow-up: a textbook range test."""
    lrs = np.logspace(-7, 1, n)
    x = np.log10(lrs)
    losses = 2.0 - np.tanh((x + 2.5) * 1.5) + np.exp(3.0 * (x - 0.2))
    return lrs, losses


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.98])
def test_suggest_on_a_u_shaped_curve(beta):
    lrs, losses = u_curve()
    s = suggest(lrs, losses, beta=beta)
    sm = smooth(losses, beta)
    m = int(np.argmin(sm))
    assert s.reason is None
    assert s.minimum_tenth == pytest.approx(lrs[m] / 10)
    assert s.steepest < s.minimum_tenth * 10
    # The descending part: from where the smoothed loss is still within 5% of its start level to its minimum.
    level = sm[5]
    fall = max(i for i in range(m) if sm[i] >= sm[m] + 0.95 * (level - sm[m]))
    assert lrs[fall] < s.steepest < lrs[m]
    # fastai's valley: half-way (in points) along the longest descent, which on this noiseless curve
    # is the whole judged part from its start (point 10) to the minimum
    assert s.valley == lrs[10 + (m - 10) - (m - 9) + (m - 9) // 3 + (m - 9) // 6]
    if beta == 0.0:  # the raw curve's steepest descent is where tanh is steepest (log10 lr = -2.5)
        assert abs(np.log10(s.steepest) + 2.5) < 0.1
    assert s.chosen == "valley" and s.best == s.valley
    assert s.band() == (min(s.values().values()), max(s.values().values()))


def test_suggest_methods_and_best():
    lrs, losses = u_curve()
    for method in METHODS:
        s = suggest(lrs, losses, method=method)
        assert s.chosen == method and s.best == getattr(s, method)
    d = suggest(lrs, losses).to_dict()
    assert d["best"] == d["valley"] and d["reason"] is None and d["chosen"] == "valley"


def test_suggest_is_pure_and_deterministic():
    lrs, losses = u_curve()
    a, b = lrs.copy(), losses.copy()
    assert suggest(lrs, losses) == suggest(list(lrs), list(losses))
    np.testing.assert_array_equal(a, lrs)
    np.testing.assert_array_equal(b, losses)


def test_suggest_too_short_and_non_finite():
    lrs, losses = u_curve(min_steps(100) - 1)
    s = suggest(lrs, losses, num_it=100)
    assert (s.steepest, s.valley, s.minimum_tenth, s.best, s.band()) == (None, None, None, None, None)
    assert s.reason == (f"only {MIN_POINTS - 1} points to judge after skipping the first tenth and the last "
                        f"{TRIM_END} (as fastai does); at least {MIN_POINTS} are needed (raise --steps)")
    assert suggest(*u_curve(min_steps(100)), num_it=100).reason is None
    s = suggest(lrs[:6], [1.0, 0.9, 0.8, 0.7, 0.6, float("inf")])
    assert s.best is None and s.reason == "the loss diverged after only 5 steps; lower --start"
    s = suggest(np.logspace(-5, 0, 30), np.full(30, np.nan))
    assert s.best is None and s.reason == "no finite losses"
    assert suggest([], []).reason == "no losses recorded"


def test_suggest_reads_the_curve_up_to_its_first_non_finite_loss():
    lrs, losses = u_curve()
    holes = losses.copy()
    holes[[60, 61, 80]] = [np.nan, np.inf, np.nan]
    s = suggest(lrs, holes)
    assert s.reason is None
    # as fastai: first the last 5 points of the curve are left out, then it ends at its first hole
    assert s == suggest(lrs[:65], losses[:65], num_it=100)
    assert s != suggest(lrs, losses)


def test_suggest_judges_fastais_part_of_the_curve():
    """fastai's lr_find skips the first num_it // 10 points and the last 5: a minimum in either part
    is not seen."""
    lrs, losses = u_curve()
    dipped = losses.copy()
    dipped[95] = -10.0  # inside the last 5 points
    dipped[3] = -10.0  # inside the first tenth
    s = suggest(lrs, dipped, beta=0.0)
    assert s == suggest(lrs, losses, beta=0.0)
    assert s.minimum_tenth == pytest.approx(lrs[int(np.argmin(losses[10:95])) + 10] / 10)
    # an early-stopped sweep still skips a tenth of the steps asked for, not of the steps done
    head = suggest(lrs[:70], losses[:70], beta=0.0, num_it=100)
    assert head.minimum_tenth == pytest.approx(lrs[int(np.argmin(losses[10:65])) + 10] / 10)


def test_suggest_never_guesses_on_a_rising_or_flat_curve():
    lrs = np.logspace(-3, 1, 50)
    rising = suggest(lrs, np.linspace(1, 5, 50))
    assert rising.best is None and rising.reason.startswith("the loss never fell")
    flat = suggest(lrs, np.ones(50))
    assert flat.best is None and "never fell" in flat.reason
    wrong_way = suggest(lrs[::-1], u_curve(50)[1])
    assert wrong_way.best is None and "does not increase" in wrong_way.reason


def test_valley_index_by_hand():
    # the longest strictly decreasing subsequence has 5 points (6 > 4 > 3 > 2 > 1, or 5 > ...);
    # it first reaches length 5 at index 8: 8 - 5 + 5 // 3 + 5 // 6 = 4
    assert valley_index(np.array([5, 6, 4, 7, 3, 3, 2, 8, 1, 9, 9])) == 4
    # a straight fall of 12 points: 11 - 12 + 4 + 2 = 5, a little before the middle
    assert valley_index(np.arange(12.0, 0.0, -1.0)) == 5
    # a rise: nothing falls, and fastai's start stays at 0
    assert valley_index(np.array([1.0, 2.0, 3.0])) == 0
    # a fall of two points at the start: 1 - 2 + 0 + 0, which fastai reads as the last point
    assert valley_index(np.array([3.0, 2.0, 4.0, 5.0])) == -1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")), st.just(float("inf"))),
                min_size=0, max_size=60),
       st.sampled_from([0.0, 0.5, 0.98]))
def test_suggest_always_answers(values, beta):
    lrs = np.logspace(-6, 1, len(values))
    s = suggest(lrs, values, beta=beta)
    made = [v for v in s.values().values() if v is not None]
    if s.reason is None:
        assert len(made) == 3
        assert all(lrs[0] / 10 <= v <= lrs[-1] for v in made)
    else:
        assert made == [] and s.reason


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, message", [
    ({"start": 0}, "start lr must be a finite number > 0"),
    ({"start": -1e-3}, "start lr must be a finite number > 0"),
    ({"start": float("nan")}, "start lr must be a finite number > 0"),
    ({"start": "fast"}, "start lr must be a finite number > 0"),
    ({"end": float("inf")}, "end lr must be a finite number > 0"),
    ({"start": 1.0, "end": 1.0}, "end lr (1.0) must be greater than its start lr (1.0)"),
    ({"start": 1.0, "end": 0.1}, "must be greater than its start"),
    ({"steps": 1}, "steps must be a whole number >= 2"),
    ({"steps": 10.5}, "steps must be a whole number >= 2"),
    ({"steps": True}, "steps must be a whole number >= 2"),
    ({"beta": 1.0}, "beta must be a number in [0, 1)"),
    ({"beta": -0.1}, "beta must be a number in [0, 1)"),
    ({"stop_factor": 1.0}, "stop factor must be a number > 1"),
    ({"stop_factor": float("nan")}, "stop factor must be a number > 1"),
    ({"method": "median"}, "unknown suggestion method 'median'; choose one of steepest, valley, minimum_tenth"),
])
def test_bad_arguments_raise_config_error_before_anything_runs(kwargs, message):
    model, opt, batches = make_problem("sgd", warm_steps=0)
    called = []
    with pytest.raises(ConfigError) as err:
        range_test(model, opt, batches, lambda m, b: called.append(1), **kwargs)
    assert message in str(err.value)
    assert not called
    exp = load_experiment("regression")
    with pytest.raises(ConfigError) as err:
        find_lr(exp, RunConfig(**exp.defaults), **kwargs)
    assert message in str(err.value)


def test_bad_inputs():
    model, opt, batches = make_problem("sgd", warm_steps=0)
    with pytest.raises(ConfigError, match="needs a torch.optim.Optimizer"):
        range_test(model, "sgd", batches, loss_of)
    with pytest.raises(ConfigError, match="cannot be iterated"):
        range_test(model, opt, 42, loss_of)
    with pytest.raises(ConfigError, match="yielded no batches in epoch 1"):
        range_test(model, opt, [], loss_of)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        range_test(model, opt, iter(batches), loss_of, steps=10)
    with pytest.raises(ConfigError, match="must return a scalar"):
        range_test(model, opt, batches, lambda m, b: (m(b[0]) - b[1]) ** 2)
    with pytest.raises(ConfigError, match="does not require grad"):
        range_test(model, opt, batches, lambda m, b: loss_of(m, b).detach())
    with pytest.raises(ConfigError, match="as many learning rates as losses"):
        suggest([1e-3, 1e-2], [1.0])
    with pytest.raises(ConfigError, match="beta"):
        suggest([1e-3], [1.0], beta=1.5)


# --------------------------------------------------------------------------- the headless find_lr


@pytest.fixture(scope="module")
def regression_runs():
    exp = load_experiment("regression")
    cfg = RunConfig(**exp.defaults).merged({"device": "cpu"})
    return find_lr(exp, cfg), find_lr(exp, cfg)


def test_find_lr_on_the_regression_example_is_stable_and_sensible(regression_runs):
    a, b = regression_runs
    assert isinstance(a, RangeTestResult)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.suggestions == b.suggestions
    s = a.suggestions
    assert s.reason is None and s.best is not None and s.chosen == "valley"
    # The sweep up to lr 10 makes this model diverge, and the test stops there.
    assert a.stopped_early and "exceeded 4x its best" in a.stop_reason
    lr_diverged = a.lrs[-1]
    # Where the smoothed loss starts falling: the last rate before its minimum at which it is still
    # within 10% of the way down from its early level to that minimum.
    sm = a.smoothed
    m = int(np.nanargmin(sm[10:-5])) + 10  # the lowest point of the part judged (fastai's)
    level = np.median(sm[: len(sm) // 5])
    lr_falling = a.lrs[max(i for i in range(m) if sm[i] >= sm[m] + 0.9 * (level - sm[m]))]
    assert lr_falling < s.steepest <= a.lrs[m]
    assert lr_falling < s.valley <= a.lrs[m]
    assert lr_falling < s.best < lr_diverged
    assert s.minimum_tenth == pytest.approx(a.lrs[m] / 10)
    lo, hi = s.band()
    assert lr_falling < lo <= hi < lr_diverged


def test_find_lr_leaves_nothing_of_the_sweep_in_the_curve(regression_runs):
    a, _ = regression_runs
    expected = 1e-7 * (10.0 / 1e-7) ** (np.arange(100) / 99)
    np.testing.assert_allclose(a.lrs, expected[: len(a)], rtol=1e-12)
    np.testing.assert_allclose(a.smoothed, smooth(a.losses, 0.98))
    d = a.to_dict()
    assert d["steps"] == 100 and d["steps_done"] == len(a) and d["suggestions"]["best"] == a.suggestions.best


def test_find_lr_reports_script_errors_with_file_and_line():
    exp = load_experiment(CORPUS / "data_fails_epoch2.py")
    with pytest.raises(ScriptError) as err:
        find_lr(exp, RunConfig(device="cpu"), steps=20)
    assert "shard-0001.pt vanished" in str(err.value) and err.value.line is not None
    assert "epoch 2" in str(err.value)


def test_find_lr_on_a_corrupt_label_stops_with_a_reason():
    exp = load_experiment(CORPUS / "nan_loss.py")
    r = find_lr(exp, RunConfig(device="cpu"), steps=50)
    assert r.stopped_early and r.stop_reason.startswith("the loss became nan")
    assert len(r) == 4 and r.suggestions.best is None
    assert "diverged after only 4 steps" in r.suggestions.reason


# --------------------------------------------------------------------------- rows and CSV


def test_rows_and_csv_round_trip(tmp_path):
    values = [1.0, 0.5, 0.25, 1 / 3, float("nan")]
    model, opt, batches, loss = scripted_losses(values)
    r = range_test(model, opt, batches, loss, steps=10)
    rows = r.to_rows()
    assert [list(row) for row in rows] == [["lr", "loss", "smoothed"]] * len(values)
    assert rows[3]["loss"] == float(np.float32(1 / 3))  # the loss tensor is float32
    path = tmp_path / "lr_find.csv"
    write_csv(r, path)
    with open(path, newline="") as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == len(values)
    for row, got in zip(rows, read):
        for k, v in row.items():
            assert float(got[k]) == v or (math.isnan(v) and math.isnan(float(got[k])))
    assert [p.name for p in tmp_path.iterdir()] == ["lr_find.csv"]  # no temporary file left
    with pytest.raises(ConfigError, match="cannot write"):
        write_csv(r, tmp_path / "missing" / "x.csv")


def test_suggestions_band_and_best_by_hand():
    s = Suggestions(1e-3, 3e-3, 2e-3, "minimum_tenth", None)
    assert s.best == 2e-3 and s.band() == (1e-3, 3e-3)
    assert Suggestions(None, None, None, "valley", "no finite losses").band() is None


def test_progress_records_the_curve_as_it_goes():
    model, opt, batches = make_problem("sgd")
    progress = RangeTestProgress(25)
    seen = []

    def on_step(i, lr, loss):
        progress.record(i, lr, loss)
        seen.append(len(progress.view()["lr"]))

    r = range_test(model, opt, batches, loss_of, start=1e-5, end=1e-2, steps=25, on_step=on_step)
    assert seen == list(range(1, 26))
    v = progress.view()
    np.testing.assert_array_equal(v["lr"], r.lrs)
    np.testing.assert_array_equal(v["loss"], r.losses)
    np.testing.assert_allclose(v["smoothed"], r.smoothed)
    assert not v["lr"].flags.writeable


def test_range_test_on_a_dataloader_leaves_the_global_rng_untouched():
    """A DataLoader draws its shuffle seed from torch's global RNG when iterated; none of it may leak."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    before = torch.get_rng_state().clone()
    range_test(model, opt, loader, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
               start=1e-4, end=1.0, steps=20)
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------- against fastai's own code


def _fastai_schedule():
    return pytest.importorskip("fastai.callback.schedule", reason="fastai is not installed (pip install fastai)")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.floats(-50, 50), st.sampled_from([0.0, 1.0, 2.0])), min_size=1, max_size=80))
def test_valley_index_is_fastais_valley(values):
    fastai = _fastai_schedule()
    lrs = np.logspace(-7, 1, len(values))
    lr, _ = fastai.valley(lrs, np.array(values), 100)
    assert lrs[valley_index(values)] == lr  # negative indices wrap in both


def _fastai_lr_find(seed: int):
    """fastai's own Learner.lr_find on a small regression (the run tests/peers/record_fastai.py records):
    its recorder's rates, smoothed losses and the raw batch losses, and its valley and minimum suggestions."""
    pytest.importorskip("fastai.callback.schedule", reason="fastai is not installed (pip install fastai)")
    from peers.record_fastai import lr_find

    run = lr_find(seed)
    return (np.array(run["lrs"], dtype=np.float64), np.array(run["smoothed"]), np.array(run["raw"]),
            run["valley"], run["minimum"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_valley_and_minimum_equal_fastais_lr_find(seed):
    lrs, smoothed, raw, valley, minimum = _fastai_lr_find(seed)
    assert len(lrs) == len(smoothed) == len(raw) > 20
    # fastai's smoothing is lrviz's (debiased EMA, beta 0.98), to float32 precision
    np.testing.assert_allclose(smooth(raw, 0.98), smoothed, rtol=2e-6)
    # fed fastai's own smoothed curve (beta=0: judged as given), lrviz picks what fastai picked
    # (fastai hands back float32 rates)
    ours = suggest(lrs, smoothed, beta=0.0, num_it=100)
    assert ours.valley == pytest.approx(valley, rel=1e-6)
    assert ours.minimum_tenth == pytest.approx(minimum, rel=1e-6)
    # and from the raw batch losses, smoothing them itself
    mine = suggest(lrs, raw, num_it=100)
    assert mine.valley == pytest.approx(valley, rel=1e-6)
    assert mine.minimum_tenth == pytest.approx(minimum, rel=1e-6)


def _fastai_recorded() -> dict:
    """fastai's own answers, recorded with fastai installed (tests/peers/record_fastai.py)."""
    import json

    return json.loads((Path(__file__).parent / "data" / "fastai_lr_find.json").read_text())


def test_valley_index_equals_fastais_recorded_valleys():
    """fastai.callback.schedule.valley's picks on 300 random curves (recorded), and lrviz's."""
    recorded = _fastai_recorded()
    assert len(recorded["valley_curves"]) == 300
    for curve in recorded["valley_curves"]:
        values = curve["values"]
        lrs = np.logspace(-7, 1, len(values))
        assert float(lrs[valley_index(values)]) == curve["valley_lr"], values


@pytest.mark.parametrize("k", [0, 1, 2])
def test_valley_and_minimum_equal_fastais_recorded_lr_find(k):
    """fastai's Learner.lr_find (recorded): same smoothing, same valley and minimum from its curve."""
    run = _fastai_recorded()["lr_find"][k]
    lrs, smoothed, raw = (np.array(run[key], dtype=np.float64) for key in ("lrs", "smoothed", "raw"))
    np.testing.assert_allclose(smooth(raw, 0.98), smoothed, rtol=2e-6)
    ours = suggest(lrs, smoothed, beta=0.0, num_it=100)
    assert ours.valley == pytest.approx(run["valley"], rel=1e-6)
    assert ours.minimum_tenth == pytest.approx(run["minimum"], rel=1e-6)
    mine = suggest(lrs, raw, num_it=100)
    assert mine.valley == pytest.approx(run["valley"], rel=1e-6)
    assert mine.minimum_tenth == pytest.approx(run["minimum"], rel=1e-6)


def test_find_lr_valley_is_fastais_valley_on_the_same_curve(regression_runs):
    """Before the fix lrviz took 2/3 of the way along the descent: 0.69x fastai's value here."""
    fastai = _fastai_schedule()
    a, _ = regression_runs
    part = slice(a.steps // 10, len(a) - 5)  # what fastai's lr_find hands to its suggestion functions
    lr, _ = fastai.valley(torch.tensor(a.lrs[part]), torch.tensor(a.smoothed[part]), a.steps)
    assert a.suggestions.valley == lr


# --------------------------------------------------------------------------- confirmation


def quadratic_problem(curvature: float = 4.0):
    """f(w) = curvature / 2 * |w - 1|^2 per batch (no noise): plain gradient descent at rate lr
    multiplies the error by (1 - lr * curvature) each step, so 1 / curvature is the best rate and
    above 2 / curvature it diverges. Also draws from every RNG, like loss_of."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(-2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(torch.ones(1, 1), torch.ones(1, 1)) for _ in range(3)]

    def loss(m, batch):
        x, y = batch
        noise = 0.0 * (random.random() + float(np.random.rand()) + float(torch.rand(())))
        return curvature / 2 * ((m(x) - y) ** 2).sum() + noise

    return model, opt, batches, loss


def test_confirmation_picks_the_rate_whose_loss_fell_most_and_says_why():
    model, opt, batches, loss = quadratic_problem(4.0)
    rates = [(0.01, "steepest"), (0.1, "valley"), (0.25, "between"), (0.6, "minimum_tenth")]
    c = confirm_rates(model, opt, batches, loss, rates, steps=8)
    by_lr = {t.lr: t for t in c.trials}
    assert [t.lr for t in c.trials] == [0.01, 0.1, 0.25, 0.6]
    assert by_lr[0.6].diverged and by_lr[0.6].end == math.inf  # |1 - 0.6 * 4| = 1.4 > 1
    # the held-out loss after 8 steps at rate lr is 18 * (1 - 4 lr)^16 (w starts 3 away from 1)
    for lr in (0.01, 0.1, 0.25):
        assert by_lr[lr].start == pytest.approx(18.0)
        assert by_lr[lr].end == pytest.approx(18.0 * (1 - 4 * lr) ** 16, abs=1e-6)
    assert c.winner is by_lr[0.25] and c.steps == 8
    assert c.reason.startswith("0.25 (between) lowered the loss most: 18 -> 0 (-100%) after 8 steps")
    assert "0.01 (steepest): 18 -> " in c.reason and "0.6 (min/10): diverged at step" in c.reason


def test_confirmation_with_no_rate_that_lowers_the_loss_has_no_winner():
    model, opt, batches, loss = quadratic_problem(4.0)
    c = confirm_rates(model, opt, batches, loss, [0.6, 1.0], steps=5)
    assert c.winner is None and all(t.diverged for t in c.trials)
    assert c.reason.startswith("none of the 2 rates lowered the loss in 5 steps")


def test_confirmation_trains_every_rate_from_the_same_weights_on_the_same_batches():
    model, opt, batches = make_problem("sgd")
    seen: list[tuple[float, int, float]] = []
    weights0 = model.fc1.weight.detach().clone()

    def spy(m, batch):
        seen.append((opt.param_groups[0]["lr"], id(batch), float(m.fc1.weight.detach().sum())))
        return loss_of(m, batch)

    rates = [1e-3, 1e-2, 3e-2]
    c = confirm_rates(model, opt, batches, spy, rates, steps=6)
    measured = held_out(6)
    per_rate = {lr: [s for s in seen if s[0] == lr] for lr in rates}
    # each rate: 6 training steps, then the held-out batches; the same batches in the same order
    orders = {lr: [b for _, b, _ in calls] for lr, calls in per_rate.items()}
    assert all(len(o) == 6 + measured for o in orders.values())
    assert orders[1e-3] == orders[1e-2] == orders[3e-2]
    # and from the same weights (the first call of every rate sees the starting weights)
    assert len({calls[0][2] for calls in per_rate.values()}) == 1
    assert per_rate[1e-3][0][2] == pytest.approx(float(weights0.sum()), abs=0)
    # the first loss is the same for every rate: same weights, batch and dropout
    assert len({t.losses[0] for t in c.trials}) == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_confirmation_restores_everything_bit_exactly(optimizer):
    model, opt, batches = make_problem(optimizer)
    before = capture(model, opt)
    c = confirm_rates(model, opt, batches, loss_of, [1e-4, 1e-3, 1e-2], steps=5)
    assert len(c.trials) == 3
    assert_unchanged(before, capture(model, opt))
    sweep = {"sgd": {"start": 1e-5, "steps": 200}, "adam": {"start": 1e-4, "steps": 100}}[optimizer]
    r = range_test(model, opt, batches, loss_of, end=1.0, confirm=True, confirm_steps=4, **sweep)
    assert r.confirmation is not None and r.suggestions.chosen == "confirmed"
    assert_unchanged(before, capture(model, opt))


def test_a_dataloaders_own_generator_is_restored_too():
    """A seeded DataLoader (generator=) draws its order from its own generator: a range test and a
    confirmation must leave it as they found it, or training afterwards sees other batches."""
    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
    g = torch.Generator().manual_seed(7)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=g)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = g.get_state().clone()
    loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    range_test(model, opt, loader, loss, start=1e-4, end=1.0, steps=30, confirm=True, confirm_steps=3)
    assert torch.equal(g.get_state(), before)
    confirm_rates(model, opt, loader, loss, [1e-3, 1e-2], steps=12)
    assert torch.equal(g.get_state(), before)


def test_candidates_span_the_band_up_to_a_tenth_of_the_rate_at_the_lowest_loss():
    s = Suggestions(1e-3, 2e-3, 0.1, "valley")
    c = candidates(s)
    assert [src for _, src in c] == ["steepest", "valley", "between", "minimum_tenth"]
    assert c[2][0] == pytest.approx(math.sqrt(2e-3 * 0.1))
    assert candidates(s, max_count=3) == [(1e-3, "steepest"), (2e-3, "valley"), (0.1, "minimum_tenth")]
    # a suggestion above minimum_tenth (the edge of the blow-up) is tried at it, named after it
    assert candidates(Suggestions(1.3, 0.2, 0.15, "valley")) == [(0.15 / math.sqrt(10), "below"),
                                                                 (0.15, "minimum_tenth")]
    # rates within 10% count once; one rate gets a lower one to compare with
    assert [src for _, src in candidates(Suggestions(1e-2, 1.05e-2, 1e-2, "valley"))] == ["below", "steepest"]
    # neighbours at most sqrt(10) apart when there is room
    wide = candidates(Suggestions(1e-5, 1e-4, 1e-3, "valley"), max_count=10)
    assert all(b / a <= math.sqrt(10) * (1 + 1e-9) for (a, _), (b, _) in zip(wide, wide[1:]))
    assert candidates(Suggestions(None, None, None, "valley", "no finite losses")) == []


def test_confirmation_is_the_default_only_when_it_costs_less_than_the_range_test():
    model, opt, batches = make_problem("adam")
    long = range_test(model, opt, batches, loss_of, start=1e-5, end=1.0, steps=200, confirm=None, confirm_steps=5)
    assert long.confirmation is not None
    cost = confirm_cost(len(long.confirmation.trials), 5)
    assert cost < len(long)
    short = range_test(model, opt, batches, loss_of, start=1e-4, end=1.0, steps=100, confirm=None, confirm_steps=60)
    assert short.confirmation is None and short.suggestions.chosen == "valley"
    n = len(candidates(short.suggestions))
    assert n >= 2 and confirm_cost(n, 60) >= len(short)
    assert short.confirm_note == (f"not confirmed: {n} rates x 60 steps would cost about "
                                  f"{confirm_cost(n, 60):.0f} steps, more than the range test's {len(short)} "
                                  "(ask for it with --confirm)")
    forced = range_test(model, opt, batches, loss_of, start=1e-4, end=1.0, steps=100, confirm=True, confirm_steps=60)
    assert forced.confirmation is not None and forced.confirm_note == ""
    off = range_test(model, opt, batches, loss_of, start=1e-5, end=1.0, steps=200, confirm=False)
    assert off.confirmation is None and off.confirm_note == ""


def test_confirmation_settings_are_checked_up_front():
    model, opt, batches = make_problem("sgd", warm_steps=0)
    with pytest.raises(ConfigError, match="confirmation steps must be a whole number >= 2"):
        range_test(model, opt, batches, loss_of, confirm=True, confirm_steps=1)
    with pytest.raises(ConfigError, match="no learning rates to confirm"):
        confirm_rates(model, opt, batches, loss_of, [])
    with pytest.raises(ConfigError, match="learning rate to confirm must be a finite number > 0"):
        confirm_rates(model, opt, batches, loss_of, [0.1, -1.0])


def test_cancelling_a_confirmation_gives_no_winner_and_restores():
    model, opt, batches = make_problem("sgd")
    before = capture(model, opt)
    c = confirm_rates(model, opt, batches, loss_of, [1e-3, 1e-2, 0.1], steps=6, should_stop=stop_after(8))
    assert c.winner is None and c.reason.startswith("cancelled after 1 of 3 rates")
    assert_unchanged(before, capture(model, opt))


# --------------------------------------------------------------------------- confirmation on held-out models

GRID = [10.0 ** k for k in range(-5, 1)]  # a x10 grid: 1e-5 ... 1
BUDGET = 300  # steps each rate trains for, grid and confirmed alike


def _final_smoothed_losses(exp, cfg, rates) -> dict[float, float]:
    """Train a fresh model at each rate for BUDGET steps (lrviz's own engine, the script's seed);
    the final smoothed training loss of each (inf when it diverged)."""
    from lrviz.lab.sweep import run_sweep

    engines = {}
    run_sweep(exp, cfg.merged({"steps": BUDGET, "epochs": None, "eval_every": None}), rates,
              on_run=lambda i, e: engines.__setitem__(i, e))
    out = {}
    for i, e in engines.items():
        loss = np.asarray(e.buffer.view()["loss"], dtype=np.float64)
        done = e.state == "finished" and np.isfinite(loss).all()
        out[rates[i]] = float(smooth(loss)[-1]) if done else math.inf
    return out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["digits_cnn", "overfit", "regression"])
def test_the_confirmed_rate_trains_within_1_5x_of_the_best_rate_of_a_x10_grid(script, one_torch_thread):
    steps = 100
    if script == "digits_cnn":
        pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
        script = str(Path(__file__).parent / "scripts" / "digits_cnn.py")
        steps = 200  # with 100, its loss falls only in the last few points, which are not judged
    exp = load_experiment(script)
    cfg = RunConfig(**exp.defaults).merged({"device": "cpu"})
    result = find_lr(exp, cfg, confirm=True, steps=steps)
    s = result.suggestions
    assert result.confirmation is not None and s.chosen == "confirmed" and s.best == s.confirmed
    assert s.confirmed in [t.lr for t in result.confirmation.trials]
    final = _final_smoothed_losses(exp, cfg, GRID + [s.confirmed])
    best = min(final[lr] for lr in GRID)
    start = float(smooth(result.losses)[0])
    assert final[s.confirmed] < 0.5 * start, final  # it learns
    assert final[s.confirmed] <= 1.5 * best, final


@pytest.mark.slow
def test_torch_lr_finders_steepest_does_not_learn_on_digits_and_the_confirmed_rate_does(tmp_path, one_torch_thread):
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
    finder = pytest.importorskip("torch_lr_finder", reason="torch-lr-finder is not installed")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    exp = load_experiment(Path(__file__).parent / "scripts" / "digits_cnn.py")
    cfg = RunConfig(**exp.defaults).merged({"device": "cpu"})
    # torch-lr-finder on the same model, optimizer and data (its defaults: 100 steps up to 10)
    torch.manual_seed(cfg.seed)
    model = exp.make_model(cfg.params)
    train, _ = exp.make_data(cfg.batch_size, cfg.params)
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    lr_finder = finder.LRFinder(model, opt, nn.CrossEntropyLoss(), device="cpu")
    lr_finder.range_test(train, start_lr=1e-7, end_lr=10, num_iter=100)
    _ax, steepest = lr_finder.plot(suggest_lr=True)
    ours = find_lr(exp, cfg, confirm=True, steps=200).suggestions.confirmed
    final = _final_smoothed_losses(exp, cfg, [steepest, ours])
    chance = math.log(10)  # the cross-entropy of a guess among 10 classes
    assert final[steepest] > 0.8 * chance, (steepest, final)  # it hardly learns
    assert final[ours] < 0.2 * chance, (ours, final)


# --------------------------------------------------------------------------- lrviz find-lr


@pytest.mark.qt
def test_find_lr_command_confirms_and_says_which_rate_won_and_why(tmp_path, capsys, one_torch_thread):
    import json

    from lrviz.cli import main

    out = tmp_path / "out"
    assert main(["find-lr", "regression", "--confirm", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    saved = json.loads((out / "lr_find.json").read_text())
    c = saved["confirmation"]
    s = saved["suggestions"]
    assert s["chosen"] == "confirmed" and s["best"] == s["confirmed"] == c["winner"]
    assert len(c["trials"]) >= 2 and c["winner"] in [t["lr"] for t in c["trials"]]
    assert all(len(t["losses"]) == c["steps"] or t["diverged"] for t in c["trials"])
    assert f"confirmation ({len(c['trials'])} rates x 20 steps): {c['reason']}" in text
    assert f"{c['winner']:.3g}" in c["reason"] and "lowered the loss" in c["reason"]
    assert f"suggested learning rate: {s['best']:.3g} (confirmed;" in text
    assert (out / "lr_find.png").stat().st_size > 5000


def test_find_lr_command_without_confirmation(tmp_path, capsys, one_torch_thread):
    import json

    from lrviz.cli import main

    out = tmp_path / "out"
    assert main(["find-lr", "regression", "--no-confirm", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "confirm" not in text and "(valley; band" in text
    assert json.loads((out / "lr_find.json").read_text())["confirmation"] is None
    # by default it confirms only when that is cheaper than the range test; this one stops early
    assert main(["find-lr", "regression", "--steps", "40"]) == 0
    text = capsys.readouterr().out
    assert "not confirmed:" in text and "(ask for it with --confirm)" in text
    assert main(["find-lr", "regression", "--confirm-steps", "1"]) == 1
    assert "confirmation steps must be a whole number >= 2" in capsys.readouterr().err
    assert main(["find-lr", "regression", "--confirm-steps", "x"]) == 1
    assert "--confirm-steps must be a whole number, not 'x'" in capsys.readouterr().err


SEEDED_LOADER = """
import torch
from torch import nn

DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "momentum": 0.9, "steps": 120, "seed": 6}


def build_model():
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def build_data(batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(256, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(1))


loss_fn = nn.MSELoss()
"""


def test_engine_confirms_between_two_steps_and_training_goes_on_exactly(tmp_path, one_torch_thread):
    """A paused run with a seeded DataLoader (its own generator): a confirmed range test and a
    confirmation on their own leave weights, optimizer, RNGs and the data order as they were.
    Before, the loader's generator was not restored and the next epoch's batches differed."""
    import time

    from lrviz.engine import TrainingEngine

    script = tmp_path / "seeded.py"
    script.write_text(SEEDED_LOADER)
    exp = load_experiment(script)
    ref = TrainingEngine(exp, RunConfig(**exp.defaults))
    ref.run()
    # paused at exactly step 5, early: from there the range test's loss still falls (a run paused "soon
    # after step 5" by a polling test went on for as many steps as a busy machine delayed the test)
    eng = TrainingEngine(exp, RunConfig(**exp.defaults), start_paused=True)
    eng.start()
    deadline = time.monotonic() + 60
    for k in range(1, 6):
        eng.step_once()
        while not (eng.step == k and eng.state == "paused") and time.monotonic() < deadline:
            time.sleep(0.001)
    assert eng.step == 5 and eng.state == "paused"
    try:
        result = eng.range_test(start=1e-4, end=10, steps=100, confirm=True, confirm_steps=5).result(timeout=60)
        c = eng.confirm_lr(rates=[1e-3, 1e-2, 0.1], steps=5).result(timeout=60)
    finally:
        eng.resume()
    assert result.confirmation is not None and len(c.trials) == 3 and c.steps == 5
    assert eng.join(60) and eng.state == "finished"
    ours = np.asarray(eng.buffer.view()["loss"])
    theirs = np.asarray(ref.buffer.view()["loss"])
    assert ours.tobytes() == theirs.tobytes()
    events = [e.data for e in eng.events if e.kind == "range_test"]
    assert [d["method"] for d in events] == [result.suggestions.chosen, "confirmed"]
    assert events[1]["suggestion"] == (None if c.winner is None else c.winner.lr) and events[1]["reason"] == c.reason


def test_a_flat_noisy_curve_gets_no_suggestion_and_a_real_fall_does():
    """A sweep over rates too low to change anything gives batch noise only: its lowest smoothed point
    lands anywhere, and a suggestion there is a guess (fastai makes one; before, lrviz made one for
    about half of such curves: whenever the lowest point was not at the very start)."""
    lrs = np.logspace(-9, -8, 30)
    guesses = found = 0
    for seed in range(40):
        noise = 0.06 * np.random.default_rng(seed).standard_normal(30)
        s = suggest(lrs, 0.7 + noise)
        guesses += s.best is not None
        assert s.best is not None or s.reason.startswith("the loss never fell")
        found += suggest(lrs, 0.7 + noise - np.linspace(0, 0.3, 30)).best is not None  # the same noise on a fall
    assert guesses <= 4 and found >= 32, (guesses, found)
    s = suggest(lrs, 0.7 + 0.06 * np.random.default_rng(1).standard_normal(30))
    if s.best is None and "noise" in s.reason:
        assert "raise --end or --steps" in s.reason
