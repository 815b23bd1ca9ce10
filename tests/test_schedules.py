"""lrviz.schedules: parsing, equality with torch.optim.lr_scheduler, rescaling, plateau, state."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler

from lrviz import schedules
from lrviz.errors import ConfigError
from lrviz.schedules import SCHEDULES, ArgInfo, Schedule, ScheduleInfo, ScheduleSpec, parse_schedule

RTOL = 1e-9  # closed forms vs torch's recursive forms; the largest seen is ~1e-12
BASE = (0.1, 0.03)


# --------------------------------------------------------------------------- torch reference


def make_optimizer(base_lrs) -> torch.optim.SGD:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)], lr=base_lrs[0])


def torch_kwargs(spec: ScheduleSpec) -> dict:
    """The spec's arguments as torch's scheduler of the same name takes them."""
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.args}
    if spec.name in ("CyclicLR", "OneCycleLR"):
        kw["cycle_momentum"] = False  # torch's default; lrviz never cycles momentum
    return kw


def record(opt, sched, n: int) -> list[list[float]]:
    """The rates used at each of n steps, stepping the scheduler after each update."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            out.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
    return out


def torch_rates(spec: ScheduleSpec, base_lrs, n: int) -> list[list[float]]:
    opt = make_optimizer(base_lrs)
    return record(opt, getattr(lr_scheduler, spec.name)(opt, **torch_kwargs(spec)), n)


def our_rates(spec: ScheduleSpec, base_lrs, n: int) -> list[list[float]]:
    schedule = spec.bind(base_lrs)
    return [schedule.lrs(t) for t in range(n)]


def assert_rates_equal(ours, ref, rtol: float = RTOL, atol: float = 0.0) -> None:
    assert len(ours) == len(ref)
    for t, (a, b) in enumerate(zip(ours, ref)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert all(isinstance(v, float) for v in a)
            assert abs(x - y) <= rtol * max(abs(x), abs(y)) + atol, f"step {t}: {a} != torch {b}"


# (spec text, number of steps); every case runs with two param groups.
TORCH_CASES = [
    ("StepLR:step_size=7,gamma=0.5", 100),
    ("StepLR:step_size=1,gamma=0.9", 60),
    ("StepLR:step_size=30", 100),
    ("StepLR:step_size=10,gamma=1.5", 80),
    ("MultiStepLR:milestones=5;20;21,gamma=0.3", 60),
    ("MultiStepLR:milestones=1;100", 150),
    ("ExponentialLR:gamma=0.97", 300),
    ("ExponentialLR:gamma=1.01", 200),
    ("ConstantLR:factor=0.5,total_iters=10", 30),
    ("ConstantLR", 20),
    ("ConstantLR:factor=0.1,total_iters=1", 10),
    ("ConstantLR:factor=1,total_iters=3", 10),
    ("LinearLR", 20),
    ("LinearLR:start_factor=0.01,total_iters=50", 80),
    ("LinearLR:start_factor=1,end_factor=0,total_iters=30", 50),
    ("LinearLR:start_factor=0.25,end_factor=0.75,total_iters=7", 20),
    ("PolynomialLR", 20),
    ("PolynomialLR:total_iters=50,power=2", 80),  # past total_iters
    ("PolynomialLR:total_iters=40,power=0.5", 60),
    ("CosineAnnealingLR:T_max=50", 230),  # past T_max: torch continues the cosine
    ("CosineAnnealingLR:T_max=1000,eta_min=1e-5", 2500),
    ("CosineAnnealingLR:T_max=1", 10),
    ("CosineAnnealingLR:T_max=7,eta_min=0.05", 40),  # eta_min above one group's base rate
    ("CosineAnnealingWarmRestarts:T_0=10", 55),
    ("CosineAnnealingWarmRestarts:T_0=5,T_mult=2", 400),
    ("CosineAnnealingWarmRestarts:T_0=3,T_mult=3,eta_min=0.001", 400),
    ("CosineAnnealingWarmRestarts:T_0=1,T_mult=2", 300),
    ("CyclicLR:base_lr=0.01,max_lr=0.1,step_size_up=10", 100),
    ("CyclicLR:base_lr=1e-4,max_lr=1e-2,step_size_up=5,step_size_down=15,mode=triangular2", 200),
    ("CyclicLR:base_lr=0.001,max_lr=0.1,step_size_up=7,mode=exp_range,gamma=0.99", 200),
    ("CyclicLR:base_lr=0.01;0.001,max_lr=0.1;0.05,step_size_up=4,step_size_down=2", 50),
    ("CyclicLR:base_lr=0.1,max_lr=0.01,step_size_up=3", 20),  # inverted cycle
    ("OneCycleLR:max_lr=0.1,total_steps=100", 100),
    ("OneCycleLR:max_lr=0.1,total_steps=100,anneal_strategy=linear", 100),
    ("OneCycleLR:max_lr=0.1,total_steps=100,three_phase=true", 100),
    ("OneCycleLR:max_lr=0.5,total_steps=37,pct_start=0.4,anneal_strategy=linear,three_phase=true", 37),
    ("OneCycleLR:max_lr=1.0;0.5,total_steps=50,div_factor=10,final_div_factor=100", 50),
    ("OneCycleLR:max_lr=0.1,epochs=4,steps_per_epoch=25,pct_start=0.25", 100),
    ("OneCycleLR:max_lr=0.1,total_steps=20,pct_start=0.0", 20),
    ("OneCycleLR:max_lr=0.1,total_steps=1", 1),
]


@pytest.mark.parametrize(("text", "n"), TORCH_CASES)
def test_equals_torch(text, n):
    spec = parse_schedule(text)
    assert_rates_equal(our_rates(spec, BASE, n), torch_rates(spec, BASE, n))


def test_every_step_schedule_is_compared_with_torch():
    compared = {parse_schedule(text).name for text, _ in TORCH_CASES}
    assert compared == set(SCHEDULES) - {"constant", "warmup", "ReduceLROnPlateau"}


def test_equals_torch_with_three_groups_and_a_zero_rate():
    base = (1.0, 0.25, 0.0)
    for text in ("CosineAnnealingLR:T_max=20,eta_min=0.001", "ExponentialLR:gamma=0.9", "LinearLR"):
        spec = parse_schedule(text)
        # torch's recursive cosine brings the 0-rate group back to -1.2e-17 instead of 0 at
        # t=2*T_max, hence an absolute tolerance at the scale of the rates here.
        assert_rates_equal(our_rates(spec, base, 50), torch_rates(spec, base, 50), atol=1e-15)


def test_cosine_past_t_max_is_periodic():
    s = parse_schedule("CosineAnnealingLR:T_max=10").bind([1.0])
    assert s.lrs(10) == [0.0]
    assert s.lrs(20)[0] == pytest.approx(1.0)
    assert s.lrs(15)[0] == pytest.approx(s.lrs(5)[0])


def test_polynomial_past_total_iters_stays_at_zero():
    s = parse_schedule("PolynomialLR:total_iters=10,power=2").bind(BASE)
    assert s.lrs(10) == s.lrs(11) == s.lrs(10_000) == [0.0, 0.0]


def test_warm_restarts_with_t_mult_restart_at_the_right_steps():
    s = parse_schedule("CosineAnnealingWarmRestarts:T_0=4,T_mult=3").bind([1.0])
    restarts = [t for t in range(1, 500) if s.lrs(t) == [1.0]]
    assert restarts == [4, 16, 52, 160, 484]  # 4, 4+12, 16+36, 52+108, 160+324


# --------------------------------------------------------------------------- OneCycleLR past the end


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_one_cycle_holds_final_value_past_total_steps(strategy):
    spec = parse_schedule(f"OneCycleLR:max_lr=0.1,total_steps=100,anneal_strategy={strategy}")
    s = spec.bind(BASE)
    final = s.lrs(99)
    assert final == pytest.approx([0.1 / 25 / 1e4] * 2, rel=1e-9)
    assert s.lrs(100) == s.lrs(101) == s.lrs(10**9) == final
    # torch: one value past the end is extrapolated, the next step raises.
    opt = make_optimizer(BASE)
    sched = lr_scheduler.OneCycleLR(opt, **torch_kwargs(spec))
    record(opt, sched, 100)
    overshoot = sched.get_last_lr()[0]
    assert overshoot > 10 * final[0] if strategy == "cos" else overshoot < 0
    with pytest.raises(ValueError, match="Tried to step"):
        record(opt, sched, 1)


def test_one_cycle_and_cyclic_ignore_the_current_rate():
    for text in ("OneCycleLR:max_lr=0.1,total_steps=50", "CyclicLR:base_lr=0.01,max_lr=0.1,step_size_up=5"):
        spec = parse_schedule(text)
        assert our_rates(spec, (1.0, 0.5), 50) == our_rates(spec, (0.2, 0.001), 50)


def test_per_group_list_must_match_group_count():
    spec = parse_schedule("OneCycleLR:max_lr=0.1;0.2;0.3,total_steps=10")
    with pytest.raises(ConfigError, match="3 values but the optimizer has 2 param group"):
        spec.bind(BASE)
    assert spec.bind([0.1, 0.1, 0.1]).lrs(0) == pytest.approx([0.004, 0.008, 0.012])


# --------------------------------------------------------------------------- warmup


def sequential(base_lrs, steps: int, start_factor: float, other: ScheduleSpec, n: int):
    opt = make_optimizer(base_lrs)
    warm = lr_scheduler.LinearLR(opt, start_factor=start_factor, end_factor=1.0, total_iters=steps)
    then = getattr(lr_scheduler, other.name)(opt, **torch_kwargs(other))
    return record(opt, lr_scheduler.SequentialLR(opt, [warm, then], milestones=[steps]), n)


SEQUENTIAL_OK = [t for t, _ in TORCH_CASES if not t.startswith("OneCycleLR")]


@pytest.mark.parametrize("other", SEQUENTIAL_OK[::2] + ["CosineAnnealingLR:T_max=900"])
@pytest.mark.parametrize(("steps", "start_factor"), [(10, 0.2), (25, None)])
def test_warmup_equals_torch_sequential(other, steps, start_factor):
    extra = "" if start_factor is None else f",start_factor={start_factor}"
    spec = parse_schedule(f"warmup:steps={steps}{extra}+{other}")
    n = steps + 150
    ref = sequential(BASE, steps, start_factor or 1 / steps, spec.then, n)
    assert_rates_equal(our_rates(spec, BASE, n), ref)


def test_warmup_alone_equals_torch_linear_lr():
    spec = parse_schedule("warmup:steps=40,start_factor=0.05")
    opt = make_optimizer(BASE)
    ref = record(opt, lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=40), 100)
    assert_rates_equal(our_rates(spec, BASE, 100), ref)
    assert our_rates(parse_schedule("warmup:steps=4"), [1.0], 6) == [
        [0.25],
        [0.4375],
        [0.625],
        [0.8125],
        [1.0],
        [1.0],
    ]


@pytest.mark.parametrize(
    "other", [t for t, _ in TORCH_CASES[::3]] + ["OneCycleLR:max_lr=0.1,total_steps=100"]
)
def test_warmup_definition_other_applied_at_n(other):
    """warmup:steps=N+X runs the ramp for N steps, then X as if applied at step N."""
    n = 30
    s = parse_schedule(f"warmup:steps={n},start_factor=0.1+{other}").bind(BASE)
    x = parse_schedule(other).bind(BASE)
    for t in range(n):
        assert s.lrs(t) == [b * (0.1 + 0.9 * t / n) for b in BASE]
    for t in range(n, n + 200):
        assert s.lrs(t) == x.lrs(t - n)


def test_torch_sequential_with_one_cycle_is_the_known_quirk():
    """torch's OneCycleLR overwrites initial_lr, so SequentialLR warms up towards max_lr/div_factor."""
    other = parse_schedule("OneCycleLR:max_lr=0.1,total_steps=100")
    ref = sequential(BASE, 10, 0.2, other, 10)
    assert ref[0] == pytest.approx([0.2 * 0.1 / 25] * 2)  # not 0.2 * base
    ours = our_rates(parse_schedule("warmup:steps=10,start_factor=0.2+" + str(other)), BASE, 10)
    assert ours[0] == pytest.approx([0.2 * b for b in BASE])


# --------------------------------------------------------------------------- ReduceLROnPlateau

PLATEAU_CASES = [
    "ReduceLROnPlateau",
    "ReduceLROnPlateau:factor=0.5,patience=0",
    "ReduceLROnPlateau:factor=0.5,patience=2,cooldown=2,min_lr=0.004;0.001",
    "ReduceLROnPlateau:mode=max,factor=0.3,patience=1,threshold=0.1,threshold_mode=abs,eps=1e-3",
    "ReduceLROnPlateau:mode=max,patience=1,threshold=0.05,cooldown=1,min_lr=0.01",
    "ReduceLROnPlateau:threshold_mode=abs,threshold=0,patience=3,factor=0.9",
]

metric_values = st.one_of(
    st.floats(-5, 5, allow_nan=False),
    st.sampled_from([0.0, 1.0, 1.0001, 0.9999, math.nan, math.inf]),
)


@pytest.mark.parametrize("text", PLATEAU_CASES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metrics=st.lists(metric_values, max_size=40))
def test_plateau_equals_torch(text, metrics):
    spec = parse_schedule(text)
    ours = spec.bind(BASE)
    assert ours.stateful
    opt = make_optimizer(BASE)
    kw = torch_kwargs(spec)
    sched = lr_scheduler.ReduceLROnPlateau(opt, **kw)
    assert ours.lrs(0) == [g["lr"] for g in opt.param_groups]
    for m in metrics:
        before = [g["lr"] for g in opt.param_groups]
        sched.step(m)
        after = [g["lr"] for g in opt.param_groups]
        assert ours.observe_validation(m) == (after != before)
        assert ours.lrs(12345) == after


def test_plateau_reduces_after_patience():
    s = parse_schedule("ReduceLROnPlateau:factor=0.5,patience=2").bind([0.1])
    assert [s.observe_validation(m) for m in [1.0, 1.0, 1.0, 1.0]] == [False, False, False, True]
    assert s.lrs(0) == [0.05]
    assert s.preview(3).tolist() == [[0.05]] * 3


def test_step_schedules_ignore_validation():
    s = parse_schedule("StepLR:step_size=2").bind(BASE)
    assert not s.stateful
    assert s.observe_validation(1.0) is False
    assert s.lrs(0) == list(BASE)


# --------------------------------------------------------------------------- rescale

RESCALE_CASES = [
    "constant",
    "StepLR:step_size=7,gamma=0.5",
    "CosineAnnealingLR:T_max=100,eta_min=1e-4",
    "CyclicLR:base_lr=0.001,max_lr=0.1,step_size_up=7,mode=exp_range,gamma=0.99",
    "OneCycleLR:max_lr=0.1;0.02,total_steps=100,three_phase=true",
    "warmup:steps=10+CosineAnnealingWarmRestarts:T_0=5,T_mult=2",
]


@pytest.mark.parametrize("text", RESCALE_CASES)
@settings(max_examples=50, deadline=None)
@given(t_next=st.integers(0, 300), target=st.floats(1e-8, 10.0), later=st.integers(0, 300))
def test_rescale_hits_target_exactly_and_keeps_the_shape(text, t_next, target, later):
    s = parse_schedule(text).bind(BASE)
    original = parse_schedule(text).bind(BASE)
    assert s.rescale(t_next, target) is True
    assert s.lrs(t_next)[0] == target
    factor = target / original.lrs(t_next)[0]
    for t in (t_next, t_next + later, later):
        assert s.lrs(t) == pytest.approx([x * factor for x in original.lrs(t)], rel=1e-12, abs=0)


def test_rescale_twice_and_from_zero():
    s = parse_schedule("ExponentialLR:gamma=0.9").bind(BASE)
    assert s.rescale(5, 0.0)
    assert s.lrs(5) == [0.0, 0.0] and s.lrs(50) == [0.0, 0.0]
    assert s.rescale(10, 0.02)
    assert s.lrs(10)[0] == 0.02
    assert s.lrs(11) == pytest.approx([0.018, 0.018 * 0.3])


@pytest.mark.parametrize(
    ("text", "t_zero"),
    [("CosineAnnealingLR:T_max=50", 50), ("PolynomialLR:total_iters=20", 25), ("LinearLR:end_factor=0", 9)],
)
def test_rescale_where_the_rate_is_zero_returns_false(text, t_zero):
    s = parse_schedule(text).bind(BASE)
    assert s.lrs(t_zero)[0] == 0.0
    before = s.preview(60)
    assert s.rescale(t_zero, 0.01) is False
    assert np.array_equal(s.preview(60), before)


def test_rescale_plateau_scales_current_rates():
    s = parse_schedule("ReduceLROnPlateau:factor=0.5,patience=0").bind(BASE)
    assert s.rescale(3, 0.2)
    assert s.lrs(0) == [0.2, pytest.approx(0.06)]
    s.observe_validation(1.0)
    s.observe_validation(2.0)
    assert s.lrs(9) == [0.1, pytest.approx(0.03)]
    z = parse_schedule("ReduceLROnPlateau").bind([0.0, 0.1])
    assert z.rescale(0, 0.1) is False


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_rescale_rejects_invalid_target(bad):
    with pytest.raises(ConfigError, match="learning rate must be finite and >= 0"):
        parse_schedule("constant").bind(BASE).rescale(0, bad)


# --------------------------------------------------------------------------- preview


def test_preview_shape_and_values():
    s = parse_schedule("StepLR:step_size=3,gamma=0.5").bind(BASE)
    p = s.preview(7, start=2)
    assert p.shape == (7, 2) and p.dtype == np.float64
    assert p.tolist() == [s.lrs(t) for t in range(2, 9)]
    assert s.preview(0).shape == (0, 2)
    with pytest.raises(ValueError):
        s.preview(-1)
    with pytest.raises(ValueError):
        s.lrs(-1)


def test_lrs_returns_a_fresh_list():
    for text in ("constant", "ConstantLR", "ReduceLROnPlateau"):
        s = parse_schedule(text).bind(BASE)
        first = s.lrs(0)
        expected = list(first)
        first.append(1.0)
        s.lrs(0)[0] = 99.0
        assert s.lrs(0) == expected


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("text", RESCALE_CASES + ["ExponentialLR:gamma=0.99"])
def test_state_dict_round_trip_continues_identically(text):
    s = parse_schedule(text).bind(BASE)
    s.rescale(17, 0.0123)
    saved = json.loads(json.dumps(s.state_dict()))
    restored = Schedule.from_state_dict(saved)
    assert restored.spec == s.spec and restored.base_lrs == s.base_lrs
    assert np.array_equal(restored.preview(300), s.preview(300))
    # load_state_dict into a schedule bound with other (e.g. already rescaled) rates
    other = parse_schedule(text).bind([0.5, 0.5])
    other.load_state_dict(saved)
    assert np.array_equal(other.preview(300), s.preview(300))


def test_plateau_state_dict_round_trip():
    metrics = [1.0, 0.9, 0.95, 0.97, 0.99, 0.98, 1.0, 1.1, 0.5, 0.6, 0.7, 0.8]
    text = "ReduceLROnPlateau:factor=0.5,patience=1,cooldown=1,min_lr=0.01"
    s = parse_schedule(text).bind(BASE)
    for m in metrics[:6]:
        s.observe_validation(m)
    saved = json.loads(json.dumps(s.state_dict()))
    restored = Schedule.from_state_dict(saved)
    for m in metrics[6:]:
        assert restored.observe_validation(m) == s.observe_validation(m)
        assert restored.lrs(0) == s.lrs(0)
    fresh = parse_schedule("ReduceLROnPlateau").bind(BASE)
    best_inf = json.loads(json.dumps(fresh.state_dict()))  # best = inf survives JSON
    assert Schedule.from_state_dict(best_inf).state_dict() == fresh.state_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(spec="StepLR:step_size=5"), "does not match"),
        (lambda d: d.update(base_lrs=[0.1]), "1 param group"),
        (lambda d: d.update(format=99), "unsupported schedule state format"),
        (lambda d: d.pop("scale"), "invalid saved schedule state"),
    ],
)
def test_load_state_dict_errors(mutate, message):
    s = parse_schedule("StepLR:step_size=3").bind(BASE)
    d = s.state_dict()
    mutate(d)
    with pytest.raises(ConfigError, match=message):
        s.load_state_dict(d)


# --------------------------------------------------------------------------- parsing

BRIEF_EXAMPLES = [
    "StepLR:step_size=100,gamma=0.5",
    "CosineAnnealingLR:T_max=1000,eta_min=1e-5",
    "OneCycleLR:max_lr=0.1,total_steps=1000",
    "ExponentialLR:gamma=0.999",
    "ReduceLROnPlateau:factor=0.5,patience=3",
    "CyclicLR:base_lr=1e-4,max_lr=1e-2,step_size_up=200",
    "LinearLR",
    "PolynomialLR:total_iters=500,power=2",
    "CosineAnnealingWarmRestarts:T_0=100,T_mult=2",
    "MultiStepLR:milestones=100;200,gamma=0.1",
    "ConstantLR:factor=0.5,total_iters=10",
    "warmup:steps=100+CosineAnnealingLR:T_max=900",
    "warmup:steps=100",
    "constant",
    "none",
]


@pytest.mark.parametrize("text", BRIEF_EXAMPLES)
def test_examples_parse_and_round_trip(text):
    spec = parse_schedule(text)
    assert parse_schedule(str(spec)) == spec
    assert str(parse_schedule(str(spec))) == str(spec)
    assert hash(spec) == hash(parse_schedule(str(spec)))


def test_parsed_values_and_canonical_text():
    spec = parse_schedule("  steplr : Gamma = 0.5 , STEP_SIZE=1e+3 ")
    assert spec.name == "StepLR"
    assert spec.args == (("step_size", 1000), ("gamma", 0.5))
    assert isinstance(spec.kwargs["step_size"], int)
    assert str(spec) == "StepLR:step_size=1000,gamma=0.5"
    assert str(parse_schedule("NONE")) == "constant"
    assert parse_schedule("multisteplr:milestones=10; 20").kwargs == {"milestones": (10, 20)}
    assert parse_schedule("CyclicLR:base_lr=1e-4,max_lr=0.01;0.02,mode=Exp_Range").kwargs == {
        "base_lr": 1e-4,
        "max_lr": (0.01, 0.02),
        "mode": "exp_range",
    }
    chained = parse_schedule("Warmup:steps=1e2 + cosineannealinglr:t_max=9e+2,eta_min=1E-5")
    assert str(chained) == "warmup:steps=100+CosineAnnealingLR:T_max=900,eta_min=1e-05"
    assert chained.then == parse_schedule("CosineAnnealingLR:T_max=900,eta_min=1e-5")
    assert (
        parse_schedule("OneCycleLR:max_lr=0.1,total_steps=10,three_phase=YES").kwargs["three_phase"] is True
    )


def test_spec_built_from_python_values_equals_parsed():
    spec = ScheduleSpec("cosineannealinglr", {"t_max": 900.0, "eta_min": 1e-5})
    assert spec == parse_schedule("CosineAnnealingLR:T_max=900,eta_min=1e-5")
    assert ScheduleSpec("MultiStepLR", [("milestones", [5, 10])]).kwargs == {"milestones": (5, 10)}
    assert ScheduleSpec("OneCycleLR", {"max_lr": [0.1], "total_steps": 5}).kwargs["max_lr"] == 0.1
    warm = ScheduleSpec("warmup", {"steps": 10}, then=ScheduleSpec("ExponentialLR", {"gamma": 0.9}))
    assert warm == parse_schedule("warmup:steps=10+ExponentialLR:gamma=0.9")


def test_catalogue_matches_torch_signatures():
    import inspect

    assert list(SCHEDULES)[:2] == ["constant", "warmup"]
    for name, info in SCHEDULES.items():
        assert isinstance(info, ScheduleInfo) and info.name == name and info.doc
        assert all(isinstance(a, ArgInfo) and a.help for a in info.args)
        assert info.stateful == (name == "ReduceLROnPlateau")
        if name in ("constant", "warmup"):
            continue
        params = inspect.signature(getattr(lr_scheduler, name)).parameters
        for a in info.args:
            assert a.name in params, f"{name}.{a.name} is not a torch argument"
            torch_default = params[a.name].default
            if a.name == "cycle_momentum":
                assert a.default is False  # deliberately not torch's True
            elif not a.required and a.kind in (int, float, str, bool):
                assert a.default == torch_default, f"{name}.{a.name}"
            if a.choices:
                assert a.default in a.choices


# Every argument's range, for generating valid specs.
def value_strategy(arg) -> st.SearchStrategy:
    lo = arg.low if arg.low is not None else -1e6
    hi = arg.high if arg.high is not None else 1e6
    kind = arg.info.kind
    if kind is bool:
        return st.booleans()
    if kind is str:
        return st.sampled_from(arg.info.choices)
    if kind is int or kind == "list[int]":
        ints = st.integers(int(math.ceil(lo)) + arg.low_open, min(int(hi), 10**6))
        if kind is int:
            return ints
        return st.lists(ints, min_size=1, max_size=4, unique=True).map(lambda xs: tuple(sorted(xs)))
    floats = st.floats(lo, hi, exclude_min=arg.low_open, exclude_max=arg.high_open, allow_nan=False)
    if kind is float:
        return floats
    return st.one_of(floats, st.lists(floats, min_size=2, max_size=3).map(tuple))


@st.composite
def specs(draw, allow_chain: bool = True) -> ScheduleSpec:
    name = draw(st.sampled_from(list(SCHEDULES)))
    d = schedules._DEFS[name]
    args = {}
    for arg in d.args:
        if arg.info.required or draw(st.booleans()):
            args[arg.info.name] = draw(value_strategy(arg))
    args.pop("cycle_momentum", None)
    if name == "OneCycleLR" and "total_steps" in args:
        args.pop("epochs", None)
        args.pop("steps_per_epoch", None)
    then = None
    if name == "warmup" and allow_chain and draw(st.booleans()):
        then = draw(specs(allow_chain=False))
        assume(then.name not in ("warmup", "ReduceLROnPlateau"))
    try:
        return ScheduleSpec(name, args, then)
    except ConfigError:
        assume(False)
        raise


@settings(max_examples=400, deadline=None)
@given(spec=specs())
def test_round_trip_any_valid_spec(spec):
    text = str(spec)
    again = parse_schedule(text)
    assert again == spec and str(again) == text and hash(again) == hash(spec)
    # case and spaces do not matter
    assert parse_schedule(" " + text.lower().replace(",", " , ").replace("+", " + ")) == spec


def per_group_lengths(spec: ScheduleSpec) -> set[int]:
    """Lengths of the per-group lists (max_lr=0.1;0.2...) in a spec and its successor."""
    found = {len(v) for k, v in spec.args if isinstance(v, tuple) and k != "milestones"}
    return found | (per_group_lengths(spec.then) if spec.then else set())


@settings(max_examples=200, deadline=None)
@given(spec=specs(), n=st.integers(0, 20), start=st.integers(0, 10**6))
def test_any_valid_spec_binds_and_evaluates(spec, n, start):
    lengths = per_group_lengths(spec)
    groups = min(lengths, default=2)
    if len(lengths) > 1:
        with pytest.raises(ConfigError, match="param group"):
            spec.bind([0.1] * groups)
        return
    s = spec.bind([0.1] * groups)
    p = s.preview(n, start)
    assert p.shape == (n, groups)
    assert not np.isnan(p).any()


# --------------------------------------------------------------------------- errors

ERROR_CASES = [
    # (text, substrings the one-line message must contain)
    ("", ["empty schedule", "StepLR:step_size=100"]),
    ("   ", ["empty schedule"]),
    (
        "StepLr2:step_size=3",
        ["unknown schedule 'StepLr2'", "did you mean 'StepLR'", "known:", "CosineAnnealingLR"],
    ),
    ("cosine_annealing:T_max=3", ["unknown schedule", "did you mean 'CosineAnnealingLR'"]),
    ("Frobnicate", ["unknown schedule 'Frobnicate'", "known: constant, warmup, StepLR"]),
    (
        "StepLR:step_size=3,gama=0.5",
        ["StepLR has no argument 'gama'", "did you mean 'gamma'", "valid: step_size, gamma"],
    ),
    ("StepLR:step_size=3,last_epoch=5", ["'last_epoch' is not supported", "counts steps itself", "valid:"]),
    ("CyclicLR:base_lr=0.1,max_lr=1,base_momentum=0.8", ["not supported", "momentum"]),
    ("constant:x=1", ["constant has no argument 'x'", "valid: none"]),
    ("CosineAnnealingLR", ["CosineAnnealingLR needs T_max", "e.g. CosineAnnealingLR:T_max=1000"]),
    ("CosineAnnealingLR:eta_min=0.1", ["needs T_max"]),
    ("StepLR:gamma=0.5", ["StepLR needs step_size", "StepLR:step_size=100"]),
    ("ExponentialLR", ["needs gamma"]),
    ("MultiStepLR", ["needs milestones", "milestones=100;200"]),
    ("CyclicLR:max_lr=0.1", ["CyclicLR needs base_lr"]),
    ("OneCycleLR:total_steps=10", ["OneCycleLR needs max_lr"]),
    ("OneCycleLR:max_lr=0.1", ["needs total_steps", "epochs and steps_per_epoch"]),
    ("OneCycleLR:max_lr=0.1,epochs=3", ["needs total_steps"]),
    ("OneCycleLR:max_lr=0.1,total_steps=10,epochs=2,steps_per_epoch=5", ["not both"]),
    ("OneCycleLR:max_lr=0.1,total_steps=10,pct_start=0.1", ["single step"]),
    ("warmup", ["warmup needs steps"]),
    ("StepLR:step_size=3,gamma=abc", ["StepLR: gamma must be a number, got 'abc'"]),
    ("StepLR:step_size=2.5", ["step_size must be a whole number, got '2.5'"]),
    ("StepLR:step_size=ten", ["step_size must be a whole number"]),
    ("StepLR:step_size=3,gamma=nan", ["gamma must be a finite number"]),
    ("StepLR:step_size=3,gamma=inf", ["gamma must be a finite number"]),
    ("StepLR:step_size=3,gamma=1e999", ["finite"]),
    ("StepLR:step_size=1" + "0" * 400, ["step_size is too large"]),
    ("OneCycleLR:max_lr=0.1,total_steps=10,three_phase=maybe", ["three_phase must be true or false"]),
    (
        "CyclicLR:base_lr=0.1,max_lr=1,mode=sawtooth",
        ["mode must be one of triangular, triangular2, exp_range"],
    ),
    ("CyclicLR:base_lr=0.1,max_lr=1,mode=exp_range,gamma=1.1", ["gamma must be in (0, 1]"]),
    ("OneCycleLR:max_lr=1,total_steps=10,div_factor=1e-320", ["div_factor", "too small"]),
    ("OneCycleLR:max_lr=1,total_steps=10,final_div_factor=1e-320", ["final_div_factor", "too small"]),
    ("OneCycleLR:max_lr=0.1,total_steps=10,anneal_strategy=cosine", ["one of cos, linear"]),
    ("MultiStepLR:milestones=100;abc", ["milestones must be a whole number, got 'abc'"]),
    ("MultiStepLR:milestones=100;;200", ["empty item"]),
    ("StepLR:step_size=3,gamma=0", ["gamma must be > 0, got 0.0"]),
    ("StepLR:step_size=3,gamma=-0.5", ["gamma must be > 0"]),
    ("ExponentialLR:gamma=0", ["gamma must be > 0"]),
    ("StepLR:step_size=0", ["step_size must be >= 1, got 0"]),
    ("CosineAnnealingLR:T_max=0", ["T_max must be >= 1, got 0"]),
    ("CosineAnnealingLR:T_max=-5", ["T_max must be >= 1"]),
    ("CosineAnnealingLR:T_max=10,eta_min=-1", ["eta_min must be >= 0"]),
    ("CosineAnnealingWarmRestarts:T_0=10,T_mult=0", ["T_mult must be >= 1"]),
    ("MultiStepLR:milestones=200;100", ["milestones must be strictly increasing, got 200;100"]),
    ("MultiStepLR:milestones=100;100", ["strictly increasing"]),
    ("MultiStepLR:milestones=0;100", ["milestones must be >= 1"]),
    ("ReduceLROnPlateau:factor=1", ["factor must be in (0, 1), got 1.0"]),
    ("ReduceLROnPlateau:factor=1.5", ["factor must be in (0, 1)"]),
    ("ReduceLROnPlateau:factor=0", ["factor must be in (0, 1)"]),
    ("ReduceLROnPlateau:patience=-1", ["patience must be >= 0"]),
    ("ReduceLROnPlateau:mode=up", ["mode must be one of min, max"]),
    ("ReduceLROnPlateau:min_lr=-1", ["min_lr must be >= 0"]),
    ("ConstantLR:factor=0", ["factor must be in (0, 1]"]),
    ("ConstantLR:total_iters=0", ["total_iters must be >= 1"]),
    ("LinearLR:start_factor=0", ["start_factor must be in (0, 1]"]),
    ("LinearLR:end_factor=1.5", ["end_factor must be in [0, 1]"]),
    ("PolynomialLR:power=-1", ["power must be >= 0"]),
    ("OneCycleLR:max_lr=0,total_steps=10", ["max_lr must be > 0"]),
    ("OneCycleLR:max_lr=0.1,total_steps=10,pct_start=1.5", ["pct_start must be in [0, 1]"]),
    (
        "CyclicLR:base_lr=1e-4,max_lr=1e-2,cycle_momentum=true",
        ["cycle_momentum=true is not supported", "momentum"],
    ),
    ("OneCycleLR:max_lr=0.1,total_steps=100,cycle_momentum=true", ["OneCycleLR: cycle_momentum=true"]),
    ("warmup:steps=0", ["steps must be >= 1"]),
    ("warmup:steps=10,start_factor=0", ["start_factor must be in (0, 1]"]),
    ("StepLR:step_size", ["malformed argument 'step_size'", "expected name=value"]),
    ("StepLR:step_size=", ["malformed argument 'step_size='"]),
    ("StepLR:=3", ["malformed argument"]),
    ("StepLR:step_size=3,", ["malformed argument ''"]),
    ("StepLR:", ["nothing after ':'"]),
    ("Step LR:step_size=3", ["malformed schedule", "expected Name or Name:arg=value"]),
    ("3StepLR", ["malformed schedule"]),
    (":step_size=3", ["malformed schedule"]),
    ("StepLR:step_size=3,step_size=4", ["'step_size' is given twice"]),
    ("StepLR:step_size=3,STEP_SIZE=4", ["given twice"]),
    ("+StepLR:step_size=3", ["nothing before '+'"]),
    ("warmup:steps=10+", ["steps must be a whole number, got '10+'"]),
    ("StepLR:step_size=10+ExponentialLR:gamma=0.9", ["only warmup can be followed", "not StepLR"]),
    ("warmup:steps=10+warmup:steps=5", ["warmup cannot be followed by warmup"]),
    ("warmup:steps=10+ReduceLROnPlateau", ["warmup cannot be followed by ReduceLROnPlateau"]),
    ("warmup:steps=1+StepLR:step_size=1+ExponentialLR:gamma=0.9", ["too many '+'"]),
    ("warmup:steps=10+Foo", ["unknown schedule 'Foo'"]),
]


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES, ids=[t or "empty" for t, _ in ERROR_CASES])
def test_parse_errors(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_schedule(text)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_non_text_and_bad_base_lrs():
    with pytest.raises(ConfigError, match="must be text"):
        parse_schedule(None)  # type: ignore[arg-type]
    spec = parse_schedule("StepLR:step_size=3")
    for bad, message in [
        ([], "at least one"),
        ([0.1, -1.0], "finite and >= 0"),
        ([math.nan], "finite"),
        (["x"], "must be numbers"),
    ]:
        with pytest.raises(ConfigError, match=message):
            spec.bind(bad)
    with pytest.raises(ConfigError, match="step_size must be a whole number, got True"):
        ScheduleSpec("StepLR", {"step_size": True})
    with pytest.raises(ConfigError, match="given twice"):
        ScheduleSpec("StepLR", [("step_size", 3), ("step_size", 4)])


def test_big_gamma_saturates_instead_of_raising():
    s = parse_schedule("ExponentialLR:gamma=10").bind([1.0, 0.0])
    huge = s.lrs(10_000)
    assert huge[0] > 1e300 and math.isfinite(huge[0]) and huge[1] == 0.0
