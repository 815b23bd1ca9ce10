"""The built-in examples: every one loads and trains; the teaching examples show their effect."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine
from lrviz.errors import ScriptError
from lrviz.experiment import example_paths, load_experiment

EXAMPLES = example_paths()
SURFACE_SCRIPTS = [p for p in EXAMPLES if p.stem.startswith("surface_")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config_for(exp, steps: int | None = None, **overrides) -> RunConfig:
    cfg = RunConfig(**exp.defaults).merged({"device": "cpu", **overrides})
    if steps is not None:
        cfg.steps, cfg.epochs = steps, None
    return cfg


def train(exp, steps: int | None = None, params: dict | None = None, **overrides) -> TrainingEngine:
    cfg = config_for(exp, steps, **overrides)
    if params:
        cfg.params = {**cfg.params, **params}
    eng = TrainingEngine(exp, cfg)
    eng.run()
    return eng


def losses(eng: TrainingEngine) -> np.ndarray:
    return np.array(eng.buffer.view()["loss"])


# ---- every example -----------------------------------------------------------------------------------
def test_the_examples_are_found():
    names = {p.stem for p in EXAMPLES}
    assert {"playground", "overfit", "surface_rosenbrock", "surface_himmelblau", "surface_saddle",
            "surface_rastrigin"} <= names
    assert not any(n.startswith("_") for n in names)  # helpers are not listed


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads_and_trains(path):
    exp = load_experiment(path)
    assert exp.doc.splitlines()[0].strip(), "the docstring's first line is the title"
    assert "what to try" in exp.doc.lower()
    eng = train(exp, steps=30)
    assert eng.state == "finished", eng.error
    assert eng.step == 30
    assert np.all(np.isfinite(losses(eng)))
    assert all(math.isfinite(p.loss) for p in eng.validation)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_defaults_and_knobs_are_valid(path):
    exp = load_experiment(path)
    RunConfig(**exp.defaults).validated()
    exp.make_model(exp.params)
    exp.make_data(None, exp.params)


# ---- the 2-D surfaces --------------------------------------------------------------------------------
def surface_module():
    from lrviz.resources.examples import _surfaces

    return _surfaces


@pytest.mark.parametrize("name", ["rosenbrock", "himmelblau", "saddle", "rastrigin"])
def test_surface_minima_are_minima(name):
    spec = surface_module().SURFACES[name]
    fn = spec["fn"]
    assert spec["minima"]
    for mx, my in spec["minima"]:
        assert spec["xlim"][0] < mx < spec["xlim"][1] and spec["ylim"][0] < my < spec["ylim"][1]
        x = torch.tensor(mx, dtype=torch.float64, requires_grad=True)
        y = torch.tensor(my, dtype=torch.float64, requires_grad=True)
        value = fn(x, y)
        gx, gy = torch.autograd.grad(value, (x, y))
        assert math.hypot(float(gx), float(gy)) < 1e-3, (name, mx, my, float(gx), float(gy))
        # lower than every point on a small ring around it
        angles = torch.linspace(0, 2 * math.pi, 17, dtype=torch.float64)[:-1]
        ring = fn(mx + 0.01 * torch.cos(angles), my + 0.01 * torch.sin(angles))
        assert torch.all(ring > value.detach())


@pytest.mark.parametrize("name", ["rosenbrock", "himmelblau", "saddle", "rastrigin"])
def test_surface_fn_works_on_grids(name):
    spec = surface_module().SURFACES[name]
    xs = torch.linspace(*spec["xlim"], 40)
    ys = torch.linspace(*spec["ylim"], 30)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    z = spec["fn"](gx, gy)
    assert z.shape == (30, 40) and torch.all(torch.isfinite(z))
    assert float(z[3, 5]) == pytest.approx(float(spec["fn"](xs[5], ys[3])), rel=1e-5)


@pytest.mark.parametrize("path", SURFACE_SCRIPTS, ids=lambda p: p.stem)
def test_surface_script_contract(path):
    exp = load_experiment(path)
    mod = exp.module
    assert set(exp.params) == {"surface", "start_x", "start_y"}
    assert mod.SURFACE is mod.SURFACES[exp.params["surface"]]
    assert set(mod.PARAM_CHOICES["surface"]) == set(mod.SURFACES)
    assert path.stem == f"surface_{exp.params['surface']}"
    for key in ("fn", "xlim", "ylim", "minima"):
        assert key in mod.SURFACE
    model = exp.make_model({"start_x": 0.25, "start_y": -0.5})
    assert mod.probe(model) == {"x": 0.25, "y": -0.5}
    assert len(list(model.parameters())) == 1 and next(model.parameters()).shape == (2,)
    train_data, val = exp.make_data(None, exp.params)
    assert len(train_data) == 1 and val is None  # one full-gradient step per epoch
    start = (exp.params["start_x"], exp.params["start_y"])
    model = exp.make_model(exp.params)
    loss = mod.compute_loss(model, train_data[0]).detach()
    assert float(loss) == pytest.approx(float(mod.SURFACE["fn"](torch.tensor(start[0]), torch.tensor(start[1]))))


def test_surface_probe_is_recorded_every_step():
    exp = load_experiment("surface_himmelblau")
    eng = train(exp, steps=25)
    assert eng.state == "finished"
    assert len(eng.probe_values["x"]) == len(eng.probe_values["y"]) == 25
    x, y = eng.probe_values["x"][-1], eng.probe_values["y"][-1]
    assert exp.module.probe(eng.model) == pytest.approx({"x": x, "y": y})


def test_surface_knob_switches_the_surface():
    exp = load_experiment("surface_rosenbrock")
    model = exp.make_model({"surface": "himmelblau", "start_x": 3.0, "start_y": 2.0})
    assert float(model().detach()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("params", "knob"), [
    ({"surface": "banana"}, "surface"),
    ({"start_x": "left"}, "start_x"),
    ({"start_y": float("nan")}, "start_y"),
    ({"start_x": 1e6}, "start_x"),
])
def test_surface_bad_knob_is_a_clear_error(params, knob):
    exp = load_experiment("surface_saddle")
    with pytest.raises(ScriptError, match=knob) as info:
        exp.make_model(params)
    if knob == "surface":
        assert "rosenbrock" in str(info.value) and "rastrigin" in str(info.value)


def test_rosenbrock_too_high_lr_diverges_moderate_lr_converges():
    exp = load_experiment("surface_rosenbrock")
    high = train(exp, steps=100, lr=0.0025)
    assert high.state == "diverged"
    overshoot = train(exp, steps=10, lr=0.002)  # jumps over the hill, past the minimum's x = 1
    assert max(overshoot.probe_values["x"]) > 1.2
    good = train(exp, steps=1000, lr=1e-3, momentum=0.9)
    assert good.state == "finished"
    x, y = good.probe_values["x"][-1], good.probe_values["y"][-1]
    assert math.hypot(x - 1, y - 1) < 0.05
    tiny = train(exp, steps=1000, lr=1e-4)
    tx, ty = tiny.probe_values["x"][-1], tiny.probe_values["y"][-1]
    assert math.hypot(tx - 1, ty - 1) > 1.5  # crawls: still far away


def test_saddle_momentum_and_adam_leave_the_saddle_sooner():
    exp = load_experiment("surface_saddle")

    def steps_near_saddle(**over) -> int:
        eng = train(exp, steps=300, **over)
        xs, ys = np.array(eng.probe_values["x"]), np.array(eng.probe_values["y"])
        return int(np.sum(np.hypot(xs, ys) < 0.3))

    plain = steps_near_saddle()
    assert plain > 100
    assert steps_near_saddle(momentum=0.9) < plain / 2
    assert steps_near_saddle(optimizer="adam", lr=0.03) < plain / 2


# ---- playground --------------------------------------------------------------------------------------
PLAYGROUND_VALUES = {
    "dataset": ["spiral", "circles", "xor", "gaussians"],
    "noise": [0, 0.0, 0.3, 1],
    "label_noise": [0, 0.25, 0.5],
    "init": ["default", "xavier", "kaiming", "normal"],
    "init_scale": [0.01, 3, 10.0],
    "hidden": [1, 8, 64],
    "data_seed": [0, 7, 12345],
}


def test_playground_declares_the_knobs():
    exp = load_experiment("playground")
    assert set(exp.params) == set(PLAYGROUND_VALUES)
    choices = exp.module.PARAM_CHOICES
    assert set(choices["dataset"]) == set(PLAYGROUND_VALUES["dataset"])
    assert set(choices["init"]) == set(PLAYGROUND_VALUES["init"])


@pytest.mark.parametrize(("knob", "value"), [(k, v) for k, vs in PLAYGROUND_VALUES.items() for v in vs])
def test_playground_accepts_every_knob_value(knob, value):
    exp = load_experiment("playground")
    params = {knob: value}
    model = exp.make_model(params)
    train_data, val = exp.make_data(16, params)
    x, y = next(iter(train_data))
    assert x.shape == (16, 2) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert model(x).shape == (16, 2)
    assert val is not None


def test_playground_knobs_change_data_and_model():
    exp = load_experiment("playground")
    a = exp.make_data(None, {"dataset": "spiral"})[1][0][0]
    b = exp.make_data(None, {"dataset": "circles"})[1][0][0]
    c = exp.make_data(None, {"dataset": "spiral", "data_seed": 1})[1][0][0]
    assert not torch.equal(a, b) and not torch.equal(a, c)
    train_clean = exp.make_data(800, {"label_noise": 0.0})[0]
    train_noisy = exp.make_data(800, {"label_noise": 0.5})[0]
    yc = train_clean.dataset.tensors[1]
    yn = train_noisy.dataset.tensors[1]
    flipped = float((yc != yn).float().mean())
    assert 0.4 < flipped < 0.6
    torch.manual_seed(0)
    big = exp.make_model({"init": "normal", "init_scale": 3.0})
    assert 2.5 < float(big[2].weight.detach().std()) < 3.5
    assert exp.make_model({"hidden": 5})[0].out_features == 5


@pytest.mark.parametrize(("knob", "value", "allowed"), [
    ("dataset", "moons", "spiral"),
    ("noise", -0.1, "0"),
    ("noise", "lots", "number"),
    ("label_noise", 0.7, "0.5"),
    ("init", "he", "kaiming"),
    ("init_scale", 0, "above 0"),
    ("hidden", 0, "1"),
    ("hidden", 2.5, "whole number"),
    ("data_seed", -1, "whole number"),
    ("data_seed", True, "whole number"),
])
def test_playground_bad_knob_is_a_clear_error(knob, value, allowed):
    exp = load_experiment("playground")
    with pytest.raises(ScriptError) as info:
        exp.make_model({knob: value})
        exp.make_data(None, {knob: value})
    msg = str(info.value)
    assert knob in msg and allowed in msg and repr(value) in msg
    assert "playground.py:" in msg  # the loader names the file and the line


def test_playground_bad_knob_fails_the_run_with_the_message():
    exp = load_experiment("playground")
    eng = train(exp, steps=5, params={"init": "zeros"})
    assert eng.state == "failed"
    assert "init must be one of" in str(eng.error)


def test_playground_trains_with_other_knobs():
    exp = load_experiment("playground")
    eng = train(exp, steps=60, params={"dataset": "circles", "init": "normal", "init_scale": 3.0,
                                      "label_noise": 0.2, "hidden": 8, "noise": 0.1})
    assert eng.state == "finished"
    loss = losses(eng)
    assert np.all(np.isfinite(loss)) and loss[-10:].mean() < loss[:5].mean()


# ---- overfit -----------------------------------------------------------------------------------------
def test_overfit_opens_a_train_val_gap():
    exp = load_experiment("overfit")
    assert exp.params["n_train"] == 40
    eng = train(exp, steps=300)
    assert eng.state == "finished"
    loss = losses(eng)
    val = {p.step: p.loss for p in eng.validation}
    assert len(val) >= 30  # every 10 steps
    best_step = min(val, key=val.get)
    assert val[max(val)] > 1.05 * val[best_step]  # validation loss rose after its minimum
    assert loss[-1] < 0.2 * loss[0]  # while the training loss kept falling
    assert val[max(val)] - loss[-1] > val[best_step] - loss[best_step]  # the gap grew


@pytest.mark.parametrize(("params", "knob"), [
    ({"n_train": 1}, "n_train"), ({"width": 0}, "width"), ({"noise": -1}, "noise"), ({"width": "wide"}, "width"),
])
def test_overfit_bad_knob_is_a_clear_error(params, knob):
    exp = load_experiment("overfit")
    with pytest.raises(ScriptError, match=knob):
        exp.make_model(params)
        exp.make_data(None, params)
