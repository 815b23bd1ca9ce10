"""The divergence guard: what fires, on what, once per episode, and what stays quiet."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrviz.errors import ConfigError
from lrviz.guard import KINDS, Detection, DivergenceGuard, GuardConfig


def feed(guard: DivergenceGuard, losses, grad_norms=None, first_step: int = 0) -> list[Detection]:
    """Every detection over the series (the guard keeps running after each)."""
    losses = np.asarray(losses, dtype=np.float64)
    gns = np.ones_like(losses) if grad_norms is None else np.asarray(grad_norms, dtype=np.float64)
    out = []
    for i, (lf, gn) in enumerate(zip(losses.tolist(), gns.tolist())):
        det = guard.update(first_step + i, lf, gn)
        if det is not None:
            out.append(det)
    return out


def converging(seed: int, n: int = 3000, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Exponential decay plus iid gaussian noise (of the loss and the gradient norm)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = 2.0 * np.exp(-t / 400) + 0.2 + noise * rng.normal(size=n) * (0.3 + np.exp(-t / 800))
    gn = np.abs(3.0 * np.exp(-t / 600) + 0.5 + 0.3 * rng.normal(size=n))
    return loss, gn


def oscillating(n: int = 200, growth: float = 1.1, amplitude: float = 0.05) -> np.ndarray:
    t = np.arange(n)
    return 1.0 + amplitude * growth**t * (-1.0) ** t


# ---- quiet on healthy training ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_noisy_converging_run_fires_nothing(seed):
    loss, gn = converging(seed)
    assert feed(DivergenceGuard(), loss, gn) == []


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), noise=st.floats(0.05, 1.0), tau=st.floats(50, 2000))
def test_no_oscillation_on_noisy_convergence(seed, noise, tau):
    """Exp decay + sizeable iid noise: differences alternate often at random, but the swings shrink."""
    rng = np.random.default_rng(seed)
    t = np.arange(2000)
    loss = np.exp(-t / tau) + 0.1 + noise * rng.normal(size=t.size) * np.exp(-t / (2 * tau))
    dets = feed(DivergenceGuard(GuardConfig(enabled=("oscillation",))), loss)
    assert dets == []


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_flat_noise_fires_nothing(seed, scale):
    """A plateau with iid noise (any scale) is not an oscillation, explosion or spike."""
    rng = np.random.default_rng(seed)
    loss = scale * (1.0 + 0.3 * rng.normal(size=4000))
    gn = scale * np.abs(1.0 + 0.3 * rng.normal(size=4000))
    assert feed(DivergenceGuard(), loss, gn) == []


def test_two_batch_epochs_alternate_without_oscillation():
    """Two batches per epoch, one harder: the loss alternates every step, with shrinking swings."""
    t = np.arange(3000)
    loss = np.exp(-t / 800) * (1.0 + 0.5 * (t % 2))
    assert feed(DivergenceGuard(), loss, loss) == []


def test_one_outlier_batch_is_not_an_explosion():
    rng = np.random.default_rng(0)
    loss = 1.0 + 0.1 * rng.normal(size=500)
    loss[300] = 200.0  # one absurd batch
    assert [d.kind for d in feed(DivergenceGuard(GuardConfig(enabled=("loss_explosion",))), loss)] == []


def test_noise_near_a_converged_zero_loss_is_not_an_explosion():
    """Classification late in training: loss ~0.01 with the odd hard batch at ~1."""
    rng = np.random.default_rng(1)
    t = np.arange(20000)
    loss = np.where(rng.random(t.size) < 0.01, 1.0, 0.01) + 2.3 * np.exp(-t / 50)
    assert feed(DivergenceGuard(), loss) == []


def test_float_noise_after_exact_convergence_fires_nothing():
    rng = np.random.default_rng(2)
    t = np.arange(5000)
    loss = np.maximum(np.exp(-t / 50), 1e-12 * (1 + rng.random(t.size)))
    gn = np.maximum(np.exp(-t / 100), 1e-7 * (1 + rng.random(t.size)))
    assert feed(DivergenceGuard(), loss, gn) == []


def test_heavy_tailed_gradients_at_batch_size_one_rarely_spike():
    """|x * noise| gradient norms: the RMS reference keeps false spikes rare (< 1 per 10k steps)."""
    rng = np.random.default_rng(3)
    n = 50000
    gn = np.abs(rng.normal(size=n) * rng.normal(size=n))
    dets = feed(DivergenceGuard(GuardConfig(enabled=("grad_spike",), quiet_steps=0)), np.ones(n), gn)
    assert len(dets) < 5


# ---- nonfinite ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_fires_at_once_even_in_warmup(bad):
    g = DivergenceGuard()
    assert g.update(0, 2.0, 1.0) is None
    det = g.update(1, bad, 1.0)
    assert det is not None and det.kind == "nonfinite" and det.step == 1
    assert "step 1" in det.message and ("NaN" in det.message or "inf" in det.message)
    assert "learning rate" in det.explanation


def test_nonfinite_gradient_norm_fires():
    g = DivergenceGuard()
    feed(g, np.linspace(2, 1, 50))
    det = g.update(50, 1.0, math.inf)
    assert det is not None and det.kind == "nonfinite"
    assert "gradient norm" in det.message and "+inf" in det.message


def test_nonfinite_fires_once_per_episode_and_again_after_reset():
    g = DivergenceGuard()
    feed(g, np.linspace(2, 1, 30))
    dets = [g.update(30 + i, math.nan, math.nan) for i in range(100)]
    assert sum(d is not None for d in dets) == 1
    g.reset()
    assert g.update(0, math.nan, 1.0) is not None


def test_nonfinite_values_do_not_poison_the_statistics():
    g = DivergenceGuard()
    loss, gn = converging(7, n=1000)
    feed(g, loss[:500], gn[:500])
    g.update(500, math.nan, math.nan)
    assert feed(g, loss[500:], gn[500:], first_step=501) == []
    assert math.isfinite(g.smoothed_loss)


# ---- loss explosion ------------------------------------------------------------------------------
def test_loss_explosion_after_a_good_start():
    t = np.arange(400)
    loss = np.where(t < 200, 2.0 * np.exp(-t / 50) + 0.1, 0.1 * 1.05 ** (t - 200) + 0.1)
    dets = feed(DivergenceGuard(), loss)
    assert dets and dets[0].kind == "loss_explosion"
    det = dets[0]
    assert 230 < det.step < 300
    assert det.data["ratio"] > 4.0 and det.data["value"] > 4 * det.data["reference"]
    assert f"at step {det.step}" in det.message and "best smoothed value" in det.message
    assert "x its best" in det.message
    assert "10x" in det.explanation and "checkpoint" in det.explanation


def test_no_explosion_during_warmup():
    loss = np.concatenate([[1.0] * 10, [50.0] * 10])  # would be an explosion after warm-up
    assert feed(DivergenceGuard(GuardConfig(warmup_steps=20)), loss) == []


def test_sudden_jump_to_a_high_plateau_is_an_explosion_within_a_few_steps():
    loss = np.concatenate([np.full(100, 0.5), np.full(100, 50.0)])
    dets = feed(DivergenceGuard(), loss)
    assert dets and dets[0].kind == "loss_explosion" and 100 <= dets[0].step <= 115


def test_explosion_with_negative_losses():
    """A negative log-likelihood: 'factor x best' reads as best + (factor - 1) * |best|."""
    t = np.arange(300)
    loss = np.where(t < 150, -2.0 + np.exp(-t / 30), -2.0 + 0.05 * 1.1 ** (t - 150))
    dets = feed(DivergenceGuard(), loss)
    assert dets and dets[0].kind == "loss_explosion" and "above its best smoothed value" in dets[0].message


def test_explosion_fires_once_per_episode():
    loss = np.concatenate([np.full(100, 1.0), np.full(300, 20.0)])
    dets = feed(DivergenceGuard(GuardConfig(enabled=("loss_explosion",))), loss)
    assert len(dets) == 1


def test_real_sgd_on_a_quadratic_above_two_over_curvature_explodes():
    """On a symmetric quadratic the weight bounces but the loss c/2 w^2 only grows: loss_explosion."""
    curv = torch.tensor([1.0, 0.1], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=2.05 / 1.0)
    g = DivergenceGuard()
    det = None
    for step in range(200):
        opt.zero_grad()
        loss = 0.5 * (curv * w**2).sum()
        loss.backward()
        det = g.update(step, loss.item(), w.grad.norm().item())
        if det is not None:
            break
        opt.step()
    assert det is not None and det.kind == "loss_explosion" and det.step < 60


# ---- gradient spikes ---------------------------------------------------------------------------------
def test_grad_spike():
    rng = np.random.default_rng(4)
    gn = np.abs(2.0 + 0.2 * rng.normal(size=300))
    gn[150] = 60.0
    dets = feed(DivergenceGuard(), np.ones(300), gn)
    assert [d.kind for d in dets] == ["grad_spike"]
    det = dets[0]
    assert det.step == 150 and det.data["ratio"] > 10
    assert "60" in det.message and "step 150" in det.message


def test_grad_spike_waits_for_warmup_and_fires_once_per_episode():
    gn = np.full(200, 1.0)
    gn[5] = 100.0  # in warm-up
    gn[100:104] = 100.0  # one episode of four steps
    dets = feed(DivergenceGuard(), np.ones(200), gn)
    assert [d.step for d in dets] == [100]


def test_spikes_do_not_inflate_their_reference():
    gn = np.full(400, 1.0)
    gn[100] = 1000.0
    gn[200] = 30.0  # would hide behind an average the first spike had inflated
    dets = feed(DivergenceGuard(GuardConfig(quiet_steps=10)), np.ones(400), gn)
    assert [d.step for d in dets] == [100, 200]


# ---- oscillation -----------------------------------------------------------------------------------
def test_oscillation_on_the_textbook_trace():
    dets = feed(DivergenceGuard(), oscillating())
    assert dets and dets[0].kind == "oscillation"
    det = dets[0]
    assert det.step < 30
    assert "up and down" in det.message and "grew" in det.message
    assert det.data["ratio"] > 2.0
    assert "curvature" in det.explanation


@settings(max_examples=40, deadline=None)
@given(growth=st.floats(1.04, 1.3), amplitude=st.floats(0.001, 0.2), noise=st.floats(0.0, 0.01),
       level=st.floats(0.1, 100.0), seed=st.integers(0, 2**32 - 1))
def test_growing_oscillations_are_detected(growth, amplitude, noise, level, seed):
    rng = np.random.default_rng(seed)
    n = 300
    t = np.arange(n)
    loss = level * (1.0 + amplitude * np.minimum(growth**t, 1e6) * (-1.0) ** t + noise * rng.normal(size=n))
    dets = feed(DivergenceGuard(GuardConfig(enabled=("oscillation",))), loss)
    assert dets and dets[0].kind == "oscillation"


def test_oscillation_fires_once_per_episode():
    dets = feed(DivergenceGuard(GuardConfig(enabled=("oscillation",))), oscillating(n=120, growth=1.05))
    assert len(dets) == 1


def test_steady_two_cycle_is_not_a_growing_oscillation():
    rng = np.random.default_rng(5)
    t = np.arange(2000)
    loss = 1.0 + 0.1 * (-1.0) ** t + 0.01 * rng.normal(size=t.size)
    assert feed(DivergenceGuard(), loss) == []


def _sgd_valley(lr: float, steps: int = 300, noise: float = 0.0, seed: int = 0) -> Detection | None:
    """SGD across a valley whose walls differ (curvature 1.2 on one side, 0.8 on the other)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.tensor([0.01, 3.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    g = DivergenceGuard()
    for step in range(steps):
        opt.zero_grad()
        loss = 0.6 * torch.relu(w[0]) ** 2 + 0.4 * torch.relu(-w[0]) ** 2 + 0.05 * w[1] ** 2
        loss.backward()
        lf = loss.item() + noise * float(torch.randn((), generator=gen, dtype=torch.float64))
        det = g.update(step, lf, w.grad.norm().item())
        if det is not None:
            return det
        opt.step()
    return None


@pytest.mark.parametrize("lr", [2.1, 2.15, 2.2])
def test_real_sgd_bouncing_across_a_valley_oscillates(lr):
    det = _sgd_valley(lr)
    assert det is not None and det.kind == "oscillation"


@pytest.mark.parametrize("seed", range(4))
def test_real_sgd_with_noisy_loss_still_oscillates(seed):
    det = _sgd_valley(2.2, noise=1e-3, seed=seed)
    assert det is not None and det.kind in ("oscillation", "loss_explosion")


@pytest.mark.parametrize("lr", [0.5, 1.5, 2.0])
def test_real_sgd_below_the_limit_is_quiet(lr):
    assert _sgd_valley(lr) is None


# ---- config, state, helpers ------------------------------------------------------------------------------
def test_disabled_kinds_do_not_fire():
    g = DivergenceGuard(GuardConfig(enabled=("grad_spike",)))
    assert feed(g, oscillating()) == []
    assert g.update(500, math.nan, 1.0) is None


@pytest.mark.parametrize("kwargs", [
    {"explosion_factor": 1.0}, {"grad_spike_factor": 0.5}, {"warmup_steps": -1},
    {"oscillation_window": 4}, {"enabled": ("nonfinite", "bogus")}, {"min_rise": 1.5},
])
def test_bad_config_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        GuardConfig(**kwargs)


def test_state_dict_round_trip_continues_identically():
    loss = np.concatenate([converging(8, n=400)[0], oscillating(n=100) * 0.3])
    gn = np.abs(np.random.default_rng(8).normal(2.0, 0.2, size=loss.size))
    gn[450] = 100.0
    whole = DivergenceGuard()
    expected = feed(whole, loss, gn)

    first = DivergenceGuard()
    got = feed(first, loss[:420], gn[:420])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    second = DivergenceGuard()
    second.load_state_dict(state)
    got += feed(second, loss[420:], gn[420:], first_step=420)
    assert [d.kind for d in expected] == ["oscillation", "grad_spike", "loss_explosion"]
    assert [(d.kind, d.step, d.message) for d in got] == [(d.kind, d.step, d.message) for d in expected]
    assert repr(second.state_dict()) == repr(whole.state_dict())  # repr: NaN compares equal


def test_load_state_dict_takes_the_saved_config():
    g = DivergenceGuard(GuardConfig(oscillation_window=12, explosion_factor=3.0))
    feed(g, np.ones(30))
    h = DivergenceGuard()
    h.load_state_dict(g.state_dict())
    assert h.config == g.config


def test_reset_forgets_history_but_keeps_config():
    cfg = GuardConfig(warmup_steps=5)
    g = DivergenceGuard(cfg)
    feed(g, np.linspace(3, 1, 100))
    assert g.best_loss is not None
    g.reset()
    assert g.config is cfg and g.best_loss is None and g.smoothed_loss is None


def test_update_many_matches_update():
    loss = oscillating()
    a = DivergenceGuard()
    det_a = next(d for d in (a.update(10 + i, float(v), 1.0) for i, v in enumerate(loss)) if d is not None)
    b = DivergenceGuard()
    det_b = b.update_many(10, torch.tensor(loss), np.ones(loss.size, dtype=np.float32))
    assert det_b == det_a


def test_detection_to_dict_is_plain():
    det = DivergenceGuard().update(3, math.nan, 1.0)
    d = det.to_dict()
    assert set(d) == {"kind", "step", "message", "explanation", "data"}
    assert d["kind"] in KINDS and d["step"] == 3 and d["data"]["loss"] is None


def test_update_is_cheap():
    """~1 us a call in the common case; the bound is loose so a loaded machine does not fail it."""
    g = DivergenceGuard()
    loss, gn = converging(9, n=20000)
    pairs = list(zip(loss.tolist(), gn.tolist()))
    update = g.update
    t0 = time.perf_counter()
    for i, (lf, n) in enumerate(pairs):
        update(i, lf, n)
    per_call = (time.perf_counter() - t0) / len(pairs)
    assert per_call < 15e-6


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True),
                                 st.floats(allow_nan=True, allow_infinity=True)), max_size=120),
       warmup=st.integers(0, 30), window=st.integers(8, 24))
def test_any_floats_are_taken_without_error(values, warmup, window):
    g = DivergenceGuard(GuardConfig(warmup_steps=warmup, oscillation_window=window, quiet_steps=3))
    for step, (lf, gn) in enumerate(values):
        det = g.update(step, lf, gn)
        if det is not None:
            assert det.kind in KINDS and det.step == step and det.message and det.explanation
    state = g.state_dict()
    h = DivergenceGuard()
    h.load_state_dict(state)
    assert repr(h.state_dict()) == repr(state)
