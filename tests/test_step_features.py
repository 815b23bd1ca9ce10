"""The built-in runner's step: mixed precision, gradient accumulation and gradient clipping.

Each figure is checked against PyTorch's own recipe in a hand-written loop (``torch.autocast``,
``torch.amp.GradScaler``, ``loss / N`` per micro-batch, ``torch.nn.utils.clip_grad_norm_``) or against
``torch.optim.lr_scheduler`` for the learning-rate trace.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from stored_runs import run_and_fork

import lrviz.update
from lrviz.checkpoint import load as load_checkpoint
from lrviz.cli import main
from lrviz.config import RunConfig
from lrviz.engine import Origin, TrainingEngine
from lrviz.errors import ConfigError, ScriptError
from lrviz.experiment import load_experiment
from lrviz.interventions import Intervention, parse_at
from lrviz.lab.rangetest import find_lr, range_test
from lrviz.lab.sweep import run_sweep
from lrviz.live.serve import serving
from lrviz.store.runs import RunStore

SCRIPTS = Path(__file__).parent / "scripts"
#: torch warns when a by-hand loop's scheduler steps after a step its gradient scaler skipped.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


@pytest.fixture
def tiny():
    return load_experiment(SCRIPTS / "tiny.py")


@pytest.fixture
def precision():
    exp = load_experiment(SCRIPTS / "precision.py")
    exp.module.SEEN.clear()
    return exp


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """fp16 autocast and torch's GradScaler work on the CPU too (slowly): the same code as on CUDA,
    where lrviz offers fp16, so the scaler's bookkeeping is tested on any machine."""
    monkeypatch.setattr(lrviz.update, "FP16_DEVICES", ("cuda", "cpu"))


def col(engine: TrainingEngine, name: str) -> np.ndarray:
    return np.array(engine.buffer.view()[name])


def prepared(exp, cfg: RunConfig) -> TrainingEngine:
    """An engine prepared but not run: its model, optimizer and data as the engine itself starts them."""
    eng = TrainingEngine(exp, cfg)
    eng._prepare()
    return eng


# ---- mixed precision -------------------------------------------------------------------------------------
def test_bf16_autocast_on_cpu_trains_and_records_in_bf16(precision):
    cfg = RunConfig(lr=0.05, steps=64, seed=1, device="cpu", eval_every=32)
    full = TrainingEngine(precision, cfg)
    assert full.run() == "finished"
    assert {dtype for _, dtype in precision.module.SEEN} == {torch.float32}
    precision.module.SEEN.clear()
    half = TrainingEngine(precision, cfg.merged({"amp": "bf16"}))
    assert half.run() == "finished", half.error
    # the model ran in bf16, in training and in validation alike
    assert {grad for grad, _ in precision.module.SEEN} == {True, False}
    assert {dtype for _, dtype in precision.module.SEEN} == {torch.bfloat16}
    loss, ref = col(half, "loss"), col(full, "loss")
    assert np.all(np.isfinite(loss)) and loss[-8:].mean() < loss[:8].mean() / 4  # it learns
    # bf16 keeps 8 bits of mantissa: the same steps, measurably (not wildly) different losses
    assert not np.array_equal(loss, ref)
    np.testing.assert_allclose(loss[0], ref[0], rtol=0.05)
    assert [p.step for p in half.validation] == [31, 63]
    assert abs(half.validation[-1].loss - full.validation[-1].loss) < 0.5 * full.validation[-1].loss


def test_fp16_off_cuda_is_refused_with_what_to_use_instead(tiny, tmp_path, capsys):
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(tiny, RunConfig(steps=10, amp="fp16", device="cpu"), store)
        assert eng.run() == "failed"
        assert "fp16 needs a CUDA GPU" in str(eng.error) and "bf16" in str(eng.error)
        assert store.list_runs() == []  # refused before a run was made
    assert main(["run", str(SCRIPTS / "tiny.py"), "--steps", "10", "--amp", "fp16", "--device", "cpu",
                 "--store", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "fp16 needs a CUDA GPU" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        find_lr(tiny, RunConfig(amp="fp16", device="cpu"), steps=5)
    assert main(["run", str(SCRIPTS / "tiny.py"), "--amp", "fp8", "--store", str(tmp_path)]) == 1
    assert "unknown mixed precision 'fp8'; choose bf16, fp16 or off" in capsys.readouterr().err


def _fp16_by_hand(exp, cfg: RunConfig, steps: int) -> tuple[list[float], list[bool], list[float]]:
    """torch's AMP recipe: autocast fp16, GradScaler (unscale, clip_grad_norm_ when the config clips);
    the losses, whether each step was skipped (its scale fell), and the unscaled norms before clipping."""
    eng = prepared(exp, cfg)
    model, opt = eng.model, eng.optimizer
    assert cfg.schedule in (None, "StepLR:step_size=10,gamma=0.5")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5 if cfg.schedule else 1.0)
    scaler = torch.amp.GradScaler("cpu")
    losses, skipped, norms = [], [], []
    clip = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else float("inf")
    while len(losses) < steps:
        for batch in eng._train_data:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = exp.module.compute_loss(model, batch)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            skipped.append(scaler.get_scale() < scale)
            if len(losses) == steps:
                break
    return losses, skipped, norms


def test_fp16_skipped_steps_are_counted_and_still_steps(precision, fp16_on_cpu):
    """A loss scaled by 1e4 overflows fp16 gradients until the scaler has backed off: those steps are
    skipped (recorded with a non-finite gradient norm, counted, one event for the episode), not a divergence."""
    cfg = RunConfig(lr=5e-6, steps=40, seed=3, device="cpu", amp="fp16", schedule="StepLR:step_size=10,gamma=0.5",
                    params={"loss_scale": 1e4})
    eng = TrainingEngine(precision, cfg)
    assert eng.run() == "finished", eng.error
    losses, skipped, _ = _fp16_by_hand(precision, cfg, 40)
    assert col(eng, "loss").tolist() == losses  # the very same training, bit for bit
    assert 3 <= sum(skipped) < 30
    assert (~np.isfinite(col(eng, "grad_norm"))).tolist() == skipped
    assert eng.summary()["skipped_steps"] == sum(skipped)
    assert [(e.kind, e.step) for e in eng.events if e.kind in ("skipped_steps", "diverged", "warning")] == [
        ("skipped_steps", 0)]
    # a skipped step is still a step: the schedule moved on through it
    ref = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-6)
    sched = torch.optim.lr_scheduler.StepLR(ref, step_size=10, gamma=0.5)
    expected = []
    for _ in range(40):
        expected.append(ref.param_groups[0]["lr"])
        ref.step()
        sched.step()
    np.testing.assert_allclose(col(eng, "lr")[:, 0], expected, rtol=1e-12)


def test_fp16_clips_the_unscaled_gradients(precision, fp16_on_cpu):
    cfg = RunConfig(lr=5e-6, steps=30, seed=3, device="cpu", amp="fp16", clip_grad_norm=50.0,
                    params={"loss_scale": 1e4})
    eng = TrainingEngine(precision, cfg)
    assert eng.run() == "finished", eng.error
    losses, skipped, norms = _fp16_by_hand(precision, cfg, 30)
    gn = col(eng, "grad_norm")
    ok = ~np.array(skipped)
    assert ok.sum() > 10 and np.all(~np.isfinite(gn[~ok]))
    first = int(np.flatnonzero(ok)[0])
    assert col(eng, "loss")[:first + 1].tolist() == losses[:first + 1]
    # unscaled (the scale is 2**10 or more), before clipping: the same norm as torch's at the same weights...
    np.testing.assert_allclose(gn[first], norms[first], rtol=1e-6)
    assert gn[first] > 50.0
    # ...and, as fp16 rounds a difference in the last bit of the clipped update up to ~1e-3, close after it
    np.testing.assert_allclose(gn[ok], np.array(norms)[ok], rtol=0.05)
    np.testing.assert_allclose(col(eng, "loss"), losses, rtol=0.05)
    assert eng.summary()["clipped_steps"] == int((gn[ok] > 50.0).sum()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda_trains_with_a_gradient_scaler(precision):
    eng = TrainingEngine(precision, RunConfig(lr=5e-6, steps=200, seed=3, device="cuda", amp="fp16",
                                              params={"loss_scale": 1e4}))
    assert eng.run() == "finished", eng.error
    gn = col(eng, "grad_norm")
    assert {d for _, d in precision.module.SEEN} == {torch.float16}
    assert eng.summary()["skipped_steps"] == int((~np.isfinite(gn)).sum()) > 0
    assert np.all(np.isfinite(col(eng, "loss")))


# ---- accumulation --------------------------------------------------------------------------------------
def _accumulated_by_hand(exp, cfg: RunConfig, steps: int, n: int) -> tuple[list[float], TrainingEngine]:
    """One update per n batches (the epoch's last one per what is left), each loss / k before backward."""
    eng = prepared(exp, cfg)
    model, opt = eng.model, eng.optimizer
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    means = []
    while len(means) < steps:
        batches = list(eng._train_data)
        for i in range(0, len(batches), n):
            group = batches[i:i + n]
            opt.zero_grad()
            vals = []
            for x, y in group:
                loss = exp.module.loss_fn(model(x), y)
                (loss / len(group)).backward()
                vals.append(loss.item())
            opt.step()
            sched.step()
            means.append(float(np.mean(vals)))
            if len(means) == steps:
                break
    return means, eng


def test_accumulation_steps_once_per_n_batches_with_the_mean_loss_and_exact_lrs(tiny):
    """tiny has 32 batches an epoch: with accumulate=5 an epoch is 6 updates of 5 batches and one of 2."""
    cfg = RunConfig(lr=0.05, momentum=0.9, epochs=2, seed=2, accumulate=5, schedule="StepLR:step_size=5,gamma=0.5")
    eng = TrainingEngine(tiny, cfg)
    assert eng.run() == "finished"
    assert eng.total_steps == 14
    means, hand = _accumulated_by_hand(tiny, cfg, 14, 5)
    np.testing.assert_allclose(col(eng, "loss"), means, rtol=1e-5)
    for p, q in zip(eng.model.parameters(), hand.model.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert col(eng, "epoch").tolist() == [0] * 7 + [1] * 7
    assert col(eng, "lr")[:, 0].tolist() == [0.05 * 0.5 ** (s // 5) for s in range(14)]
    assert [p.step for p in eng.validation] == [6, 13]  # once per epoch: after its 7th update


def test_accumulation_of_one_is_a_plain_step(tiny):
    plain = TrainingEngine(tiny, RunConfig(lr=0.05, steps=40, seed=1))
    one = TrainingEngine(tiny, RunConfig(lr=0.05, steps=40, seed=1, accumulate=1))
    plain.run()
    one.run()
    assert one._updater is None
    assert col(one, "loss").tobytes() == col(plain, "loss").tobytes()


@pytest.mark.parametrize("settings", [{"accumulate": 3}, {"accumulate": 3, "clip_grad_norm": 0.3, "amp": "bf16"}],
                         ids=["accumulate", "accumulate, clip and bf16"])
def test_fork_with_accumulation_continues_bit_exactly(tiny, tmp_path, settings):
    """Step 40 with accumulate=3 (11 updates an epoch) is mid-epoch: epoch 3, batch 21 of 32."""
    cfg = RunConfig(lr=0.05, momentum=0.9, steps=70, seed=4, checkpoint_every=20, **settings)
    with RunStore(tmp_path) as store:
        parent = TrainingEngine(tiny, cfg, store)
        assert parent.run() == "finished"
        ck = next(c for c in parent.checkpoints if c.step == 40)
        assert torch.load(ck.path, weights_only=True)["batch_in_epoch"] == 21
        child = TrainingEngine(tiny, parent.config, store, origin=Origin("fork", parent.run_id, ck.path, 40))
        assert child.run() == "finished"
        a, b = store.load_steps(parent.run_id), store.load_steps(child.run_id)
        assert b["loss"].tobytes() == a["loss"][40:].tobytes()
        assert b["grad_norm"].tobytes() == a["grad_norm"][40:].tobytes()
        assert b["epoch"].tolist() == a["epoch"][40:].tolist()
        if "clip_grad_norm" in settings:
            assert child.summary()["clipped_steps"] == parent.summary()["clipped_steps"] > 0


def test_resume_with_accumulation_and_a_steered_clip_equals_an_uninterrupted_run(tiny, tmp_path):
    """The clipping threshold set at step 15 is in the checkpoint: the resumed run clips with it, and its
    losses equal the uninterrupted run's to the bit wherever the pause lands: before each of an epoch's
    11 updates (an update takes 3 of its 32 batches, the last one 2) and after its last. A pause asked
    in the middle of an update's micro-batches waits for the update's end: the loop looks at commands
    only between steps, so these are all the places.

    Before the fix, the first step after a resume measured the gradient norm with another summation
    (before the gradients were bound into one flat buffer): the clipping coefficient differed in its last
    bits and the losses after half of these pauses drifted from the uninterrupted run's."""
    steer = [Intervention(15, "set_clip", {"clip_grad_norm": 0.2})]
    cfg = RunConfig(lr=0.05, momentum=0.9, steps=90, seed=8, accumulate=3)
    ref = TrainingEngine(tiny, cfg, interventions=steer)
    ref.run()
    drifted = []
    for pause_at in range(22, 34):  # the third epoch's updates are steps 22..32
        with RunStore(tmp_path / str(pause_at)) as store:
            eng = TrainingEngine(tiny, cfg.merged({"checkpoint_every": 1000}), store, interventions=steer)
            eng.control.step_budget = pause_at  # pauses before step `pause_at`, as a step-once budget does
            eng.start()
            while eng.state != "paused":
                eng.join(0.001)
            eng.stop()
            eng.join(10)
            ck = next(c for c in eng.checkpoints if c.reason == "pause")
            assert ck.step == pause_at
            res = TrainingEngine(tiny, eng.config, store, origin=Origin("resume", eng.run_id, ck.path, ck.step))
            assert res.run() == "finished"
            assert res.clip_grad_norm == 0.2
            steps = store.load_steps(eng.run_id)
            if steps["loss"].tobytes() != col(ref, "loss").tobytes():
                drifted.append(pause_at)
            assert res.summary()["clipped_steps"] == ref.summary()["clipped_steps"] > 0
    assert drifted == []


def test_a_resume_measures_the_gradient_norm_as_its_parent_did(tiny, tmp_path):
    """The recorded gradient norms of a resumed run equal the uninterrupted run's to the bit, for a
    plain step too (the first step after the resume once summed them in another order)."""
    ref, flat_grads, steps = resumed_from_step(tiny, RunConfig(lr=0.05, steps=40, seed=3), 20, tmp_path)
    assert flat_grads is True
    assert steps["grad_norm"].tobytes() == col(ref, "grad_norm").tobytes()


def resumed_from_step(exp, cfg: RunConfig, at: int, tmp_path: Path) -> tuple[TrainingEngine, bool, dict]:
    """An uninterrupted run of ``cfg``; the same run stored, with a checkpoint at step ``at``, resumed
    from it: the uninterrupted engine, the checkpoint's ``flat_grads`` and the stored steps after the resume."""
    ref = TrainingEngine(exp, cfg)
    assert ref.run() == "finished"
    with RunStore(tmp_path / "store") as store:
        eng = TrainingEngine(exp, cfg.merged({"checkpoint_every": at}), store)
        assert eng.run() == "finished"
        ck = next(c for c in eng.checkpoints if c.step == at)
        res = TrainingEngine(exp, eng.config, store, origin=Origin("resume", eng.run_id, ck.path, ck.step))
        assert res.run() == "finished"
        return ref, load_checkpoint(ck.path)["flat_grads"], store.load_steps(eng.run_id)


PART_TIME = """
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x):
        out = self.a(x)
        if x[0, 3] != 7.0:  # the first batch of every epoch leaves b without a gradient
            out = out + self.b(x)
        return out

def build_model():
    return Model()

def build_data(batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    x[0, 3] = 7.0
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)

loss_fn = nn.MSELoss()
"""


def test_a_resume_of_a_run_whose_gradients_were_never_bound_leaves_them_unbound(tmp_path):
    """A parameter without a gradient at step 0 keeps the run's gradients unbound (the optimizer skips
    it at each epoch's first step); a resume from step 5, where every parameter has one, must not bind
    them (bound, b would get a zero gradient there and momentum would move it): the checkpoint says so."""
    script = tmp_path / "part_time.py"
    script.write_text(PART_TIME)
    ref, flat_grads, steps = resumed_from_step(load_experiment(script), RunConfig(lr=0.05, momentum=0.9, steps=20,
                                                                                   seed=1), 5, tmp_path)
    assert flat_grads is False
    assert steps["loss"].tobytes() == col(ref, "loss").tobytes()


# ---- clipping ------------------------------------------------------------------------------------------
def test_clipping_records_the_norm_before_clipping_and_updates_as_torch_clips(tiny):
    cfg = RunConfig(lr=0.05, steps=40, seed=2, clip_grad_norm=0.25)
    eng = TrainingEngine(tiny, cfg)
    assert eng.run() == "finished"
    hand = prepared(tiny, cfg)
    model, opt = hand.model, hand.optimizer
    norms = []
    for x, y in hand._train_data:
        opt.zero_grad()
        tiny.module.loss_fn(model(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)))
        opt.step()
        if len(norms) == 32:
            break
    gn = col(eng, "grad_norm")
    np.testing.assert_allclose(gn[:32], norms, rtol=1e-5)
    assert gn.max() > 4 * 0.25  # the recorded norm is not the clipped one
    hand_after_32 = [p.detach().clone() for p in model.parameters()]
    short = TrainingEngine(tiny, cfg.merged({"steps": 32}))
    short.run()
    for p, q in zip(short.model.parameters(), hand_after_32):  # torch's clipping, to float rounding
        np.testing.assert_allclose(p.detach().numpy(), q.numpy(), rtol=1e-5, atol=1e-7)
    clipped = int((gn > 0.25).sum())
    assert eng.summary()["clipped_steps"] == clipped > 0
    starts = [e for e in eng.events if e.kind == "clipping"]
    assert starts[0].step == int(np.flatnonzero(gn > 0.25)[0]) and starts[0].data["active"] is True


def test_a_clipping_episode_ends_after_quiet_steps_without_clipping(tiny):
    """A threshold only the first steps exceed: one 'on' event, one 'off' after 50 quiet steps."""
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=120, seed=2))
    eng.run()
    gn = col(eng, "grad_norm")
    threshold = float(np.sort(gn[:5])[0]) * 0.99  # the first five steps clip; later ones fall below it
    clipped = TrainingEngine(tiny, RunConfig(lr=0.05, steps=120, seed=2, clip_grad_norm=threshold))
    clipped.run()
    over = np.flatnonzero(col(clipped, "grad_norm") > threshold)
    assert over.size and over[-1] + lrviz.update.QUIET_STEPS < 120
    evs = [(e.step, e.data["active"]) for e in clipped.events if e.kind == "clipping"]
    assert evs == [(int(over[0]), True), (int(over[-1]), False)]
    assert [e.data.get("clipped_steps") for e in clipped.events if e.kind == "clipping"] == [None, over.size]


def test_step_watch_counts_episodes_not_steps():
    """Unit: clipped and skipped steps less than QUIET_STEPS apart are one episode; the guard skips skips."""
    from lrviz.records import StepBuffer
    from lrviz.update import QUIET_STEPS, ScalerAwareGuard, StepWatch

    buf = StepBuffer()
    events = []
    watch = StepWatch(buf, lambda kind, data, step: events.append((kind, step, data.get("active"))), clip=1.0,
                      count_skips=True)
    norms = np.full(300, 0.5)
    norms[[10, 20, 20 + QUIET_STEPS]] = 2.0  # one clipping episode: QUIET_STEPS - 1 quiet steps at most
    norms[200] = 3.0  # a second one, after a quiet stretch
    norms[[5, 6, 6 + QUIET_STEPS + 1]] = np.inf  # two episodes of skips (QUIET_STEPS quiet steps between)
    for i, g in enumerate(norms):
        buf.append(0, i, 1.0, g, [0.1])
        if i % 37 == 0:
            watch.scan()  # published in blocks of any size: the same answer
    watch.scan()
    assert events == [("skipped_steps", 5, None), ("clipping", 10, True), ("skipped_steps", 6 + QUIET_STEPS + 1, None),
                      ("clipping", 20 + QUIET_STEPS, False), ("clipping", 200, True), ("clipping", 200, False)]
    assert watch.summary() == {"clipped_steps": 4, "skipped_steps": 3}

    class Seen:
        def __init__(self):
            self.steps = []

        def update(self, step, loss, gn):
            self.steps.append(step)

        def update_many(self, first, losses, gns):
            for j in range(len(losses)):
                self.update(first + j, losses[j], gns[j])

    seen = Seen()
    guard = ScalerAwareGuard(seen)
    guard.update(0, 1.0, float("inf"))  # skipped: not seen
    guard.update(1, float("nan"), float("nan"))  # a non-finite loss: seen
    guard.update_many(2, np.array([1.0, 1.0, 1.0, np.inf]), np.array([0.5, np.nan, 0.5, np.inf]))
    assert seen.steps == [1, 2, 4, 5]


def test_a_clip_steered_through_submit_lands_at_the_acked_step(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=400, seed=6))
    eng.start()
    while eng.step < 60:
        eng.join(0.001)
    ack = eng.submit("set_clip", {"clip_grad_norm": 0.01}).result(30)
    s = ack["step"]
    while eng.step < s + 20:
        eng.join(0.001)
    off = eng.submit("set_clip", {"clip_grad_norm": "off"}).result(30)
    eng.join(60)
    t = off["step"]
    assert ack["data"] == {"clip_grad_norm": 0.01} and s >= 60 and t >= s + 20
    ref = TrainingEngine(tiny, RunConfig(lr=0.05, steps=400, seed=6), interventions=[
        Intervention(s, "set_clip", {"clip_grad_norm": 0.01}), Intervention(t, "set_clip", {"clip_grad_norm": None})])
    ref.run()
    assert col(eng, "loss").tobytes() == col(ref, "loss").tobytes()
    assert [(e.step, e.data) for e in eng.events if e.kind == "set_clip"] == [
        (s, {"clip_grad_norm": 0.01}), (t, {"clip_grad_norm": None})]
    assert eng.clip_grad_norm is None and eng._updater is None  # back to the plain step
    assert eng.summary()["clipped_steps"] == t - s  # every step in between: their norms are all above 0.01
    plain = TrainingEngine(tiny, RunConfig(lr=0.05, steps=400, seed=6))
    plain.run()
    loss, free = col(eng, "loss"), col(plain, "loss")
    assert loss[:s + 1].tobytes() == free[:s + 1].tobytes()  # step s's loss is measured before its update
    assert loss[s + 1] != free[s + 1]
    bad = eng.submit("set_clip", {"clip_grad_norm": -1})
    with pytest.raises(ConfigError, match="clip grad norm must be a number > 0"):
        bad.result(5)


def test_lrviz_steer_sets_the_clip_at_the_acked_step(tiny, tmp_path, capsys):
    said = {}
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=10_000_000, seed=6), store)
        with serving(eng, store):
            eng.start()
            while eng.run_id is None or eng.step < 20:
                eng.join(0.001)
            assert main(["steer", str(eng.run_id), "--clip-grad-norm", "-2", "--store", str(tmp_path)]) == 1
            assert "clip grad norm must be a number > 0" in capsys.readouterr().err
            assert main(["steer", str(eng.run_id), "--clip-grad-norm", "0.1", "--store", str(tmp_path)]) == 0
            said["out"] = capsys.readouterr().out
            step = int(said["out"].split("from step")[1].split()[0])
            while eng.step < step + 30:
                eng.join(0.001)
            eng.stop()
            eng.join(30)
        n = eng.step
        assert "clip grad norm 0.1: accepted: from step" in said["out"]
        assert [e.step for e in store.load_events(eng.run_id) if e.kind == "set_clip"] == [step]
        stored = store.load_steps(eng.run_id)["loss"]
    ref = TrainingEngine(tiny, RunConfig(lr=0.05, steps=n, seed=6),
                         interventions=[Intervention(step, "set_clip", {"clip_grad_norm": 0.1})])
    ref.run()
    assert stored.tobytes() == col(ref, "loss").tobytes()


def test_the_run_interface_sets_the_clip(tiny):
    from lrviz.live.run import LocalRun

    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=10_000_000, seed=6), start_paused=True)
    eng.start()
    run = LocalRun(eng)
    ack = run.set_clip(0.2).result(30)
    assert ack["data"] == {"clip_grad_norm": 0.2} and eng.clip_grad_norm == 0.2
    assert run.set_clip(None).result(30)["data"] == {"clip_grad_norm": None} and eng.clip_grad_norm is None
    eng.stop()
    eng.join(30)


def test_tracked_loops_refuse_a_clip_with_the_reason(tmp_path):
    import lrviz

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lrviz.track(opt) as run:
        with pytest.raises(ConfigError, match="set_clip needs lrviz's own runner"):
            run.set_clip(1.0).result(5)


# ---- settings: DEFAULTS, --at, replay, damaged checkpoints ------------------------------------------
def test_defaults_and_cli_set_the_three_settings(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text((SCRIPTS / "tiny.py").read_text().replace(
        'DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "steps": 200, "seed": 0}',
        'DEFAULTS = {"lr": 0.05, "steps": 12, "amp": "bf16", "accumulate": 2, "clip_grad_norm": 0.5}'))
    store = str(tmp_path / "store")
    assert main(["run", str(script), "--store", store, "--quiet"]) == 0
    assert main(["run", str(script), "--accumulate", "3", "--amp", "off", "--clip-grad-norm", "off",
                 "--store", store, "--quiet"]) == 0
    with RunStore(store) as s:
        a, b = s.get_run(1), s.get_run(2)
    assert (a.config["amp"], a.config["accumulate"], a.config["clip_grad_norm"]) == ("bf16", 2, 0.5)
    assert (b.config["amp"], b.config["accumulate"], b.config["clip_grad_norm"]) == (None, 3, None)
    assert "clipped_steps" in a.summary and "clipped_steps" not in b.summary
    bad = tmp_path / "bad.py"
    bad.write_text(script.read_text().replace('"accumulate": 2', '"accumulate": 0'))
    assert main(["run", str(bad), "--store", store]) == 1
    assert "DEFAULTS: accumulate (micro-batches per update) must be a whole number > 0" in capsys.readouterr().err


def test_at_sets_the_clip_and_a_replay_is_identical(tiny, tmp_path, capsys):
    at = parse_at("30:clip_grad_norm=0.1")
    assert (at.step, at.kind, at.data) == (30, "set_clip", {"clip_grad_norm": 0.1})
    with pytest.raises(ConfigError, match="clip grad norm must be a number > 0"):
        parse_at("30:clip_grad_norm=0")
    store = str(tmp_path)
    assert main(["run", str(SCRIPTS / "tiny.py"), "--steps", "80", "--accumulate", "2", "--at", "30:clip-grad-norm=0.1",
                 "--store", store, "--quiet"]) == 0
    assert main(["replay", "1", "--store", store, "--quiet"]) == 0
    assert "loss trace identical (80 steps)" in capsys.readouterr().err
    with RunStore(store) as s:
        assert [(e.step, e.data) for e in s.load_events(1) if e.kind == "set_clip"] == [(30, {"clip_grad_norm": 0.1})]


def test_fork_with_a_new_clip_applies_it_from_the_fork_step(tiny, tmp_path):
    store = str(tmp_path)
    a, b = run_and_fork(store, ["--steps", "80", "--seed", "3", "--clip-grad-norm", "5", "--checkpoint-every", "40"],
                        ["1@40", "--clip-grad-norm", "0.05"])
    with RunStore(store) as s:
        assert [(e.step, e.data) for e in s.load_events(2) if e.kind == "set_clip"] == [(40, {"clip_grad_norm": 0.05})]
    assert b["loss"][0] == a["loss"][40] and b["loss"][1:].tobytes() != a["loss"][41:].tobytes()


# ---- the range test and the sweep --------------------------------------------------------------------
class Counted:
    """An iterable of batches that counts the batches drawn."""

    def __init__(self, batches):
        self.batches = batches
        self.drawn = 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


def test_range_test_with_accumulation_takes_n_batches_a_step_and_records_their_mean(tiny):
    torch.manual_seed(0)
    batches = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(12)]
    model = tiny.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    data = Counted(batches)
    res = range_test(model, opt, data, lambda m, b: tiny.module.loss_fn(m(b[0]), b[1]), start=1e-4, end=1e-2,
                     steps=10, accumulate=4)
    assert data.drawn == 40 and len(res.lrs) == 10
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # restored
    # by hand: each step the mean over 4 batches (the data cycles every 12), loss / 4 per backward
    hand = torch.optim.SGD(model.parameters(), lr=0.1)
    stream = (batches[i % 12] for i in range(40))
    means = []
    for lr in res.lrs:
        hand.param_groups[0]["lr"] = float(lr)
        hand.zero_grad()
        vals = []
        for _ in range(4):
            x, y = next(stream)
            loss = tiny.module.loss_fn(model(x), y)
            (loss / 4).backward()
            vals.append(loss.item())
        hand.step()
        means.append(np.mean(vals))
    np.testing.assert_allclose(res.losses, means, rtol=1e-6)


def test_a_confirmation_step_takes_n_batches_too(tiny):
    from lrviz.lab.rangetest import confirm_rates, held_out

    torch.manual_seed(0)
    batches = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(40)]
    model = tiny.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_of = lambda m, b: tiny.module.loss_fn(m(b[0]), b[1])  # noqa: E731
    data = Counted(batches)
    conf = confirm_rates(model, opt, data, loss_of, [0.01, 0.03], steps=4, accumulate=3)
    assert data.drawn == 4 * 3 + held_out(4)
    # a trial's first loss is the mean over the first 3 batches, from the starting weights
    first = np.mean([loss_of(model, b).item() for b in batches[:3]])
    np.testing.assert_allclose([t.losses[0] for t in conf.trials], [first, first], rtol=1e-6)


def test_find_lr_honours_the_config_and_bf16(tiny):
    res = find_lr(tiny, RunConfig(seed=1, accumulate=2, amp="bf16", clip_grad_norm=1.0), steps=30, start=1e-4, end=1)
    assert len(res.lrs) > 10 and np.all(np.isfinite(res.losses[:10]))
    capsys_free = main(["find-lr", str(SCRIPTS / "tiny.py"), "--steps", "12", "--accumulate", "2", "--amp", "bf16"])
    assert capsys_free == 0
    with pytest.raises(ConfigError, match="accumulate"):
        range_test(tiny.make_model(), torch.optim.SGD(tiny.make_model().parameters(), lr=0.1), [], lambda m, b: 0,
                   accumulate=0)


def test_mid_run_range_test_makes_its_steps_as_the_run_does(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=100, seed=1, accumulate=4), start_paused=True)
    eng.start()
    res = eng.range_test(start=1e-3, end=1.0, steps=12).result(60)
    eng.stop()
    eng.join(30)
    assert len(res.lrs) == 12
    cfg = RunConfig(lr=0.05, steps=100, seed=1, accumulate=4)
    by_hand = prepared(tiny, cfg)
    iter(by_hand._train_data)  # the engine began its first epoch (a shuffle draws from the RNG) before it paused
    direct = range_test(by_hand.model, by_hand.optimizer, by_hand._train_data, by_hand._loss_of, start=1e-3, end=1.0,
                        steps=12, accumulate=4)
    np.testing.assert_array_equal(res.losses, direct.losses)


def test_sweep_with_accumulation_trains_each_rate_as_a_run_would(tiny, tmp_path, capsys):
    cfg = RunConfig(steps=16, seed=2, accumulate=4)
    with RunStore(tmp_path) as store:
        rows = run_sweep(tiny, cfg, [0.01, 0.1], store=store)
        assert [r.steps for r in rows] == [16, 16]
        assert store.get_run(rows[1].run_id).config["accumulate"] == 4
        swept = store.load_steps(rows[1].run_id)["loss"]
    single = TrainingEngine(tiny, cfg.merged({"lr": 0.1}))
    single.run()
    assert swept.tobytes() == col(single, "loss").tobytes()
    assert col(single, "epoch")[-1] == 1  # 16 updates of 4 batches: two epochs of 32
    store = str(tmp_path / "cli")
    assert main(["sweep", str(SCRIPTS / "tiny.py"), "--lrs", "0.01,0.1", "--steps", "8", "--accumulate", "2",
                 "--clip-grad-norm", "1", "--store", store, "--quiet"]) == 0
    with RunStore(store) as s:
        assert {(r.config["accumulate"], r.config["clip_grad_norm"]) for r in s.list_runs()} == {(2, 1.0)}


def test_a_script_error_in_a_micro_batch_names_it(tmp_path):
    script = tmp_path / "s.py"
    script.write_text((SCRIPTS / "tiny.py").read_text() + '''

_calls = [0]


def compute_loss(model, batch):
    _calls[0] += 1
    if _calls[0] == 7:
        raise ValueError("bad batch")
    x, y = batch
    return loss_fn(model(x), y)
''')
    exp = load_experiment(script)
    eng = TrainingEngine(exp, RunConfig(steps=10, accumulate=3))
    assert eng.run() == "failed"
    assert isinstance(eng.error, ScriptError)
    assert "training step 2 (epoch 1, micro-batch 1 of 3)" in str(eng.error) and "bad batch" in str(eng.error)


def test_a_steered_clip_is_marked_on_the_plots():
    from lrviz.export import event_markers
    from lrviz.records import Event

    marks = event_markers([Event(30, "set_clip", {"clip_grad_norm": 0.5}), Event(90, "set_clip", {"clip_grad_norm": None}),
                           Event(40, "clipping", {"active": True})])
    assert [(m.step, m.text) for m in marks] == [(30, "clip 0.5"), (90, "no clipping")]
