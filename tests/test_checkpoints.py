"""Checkpoints, fork, resume and roll-back: continuing from a step is exact on CPU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from stored_runs import run_and_fork

from lrviz.cli import main
from lrviz.config import RunConfig
from lrviz.engine import Origin, TrainingEngine
from lrviz.experiment import load_experiment
from lrviz.interventions import Intervention
from lrviz.store.runs import RunStore

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def tiny():
    return load_experiment(SCRIPTS / "tiny.py")


def wait_for(pred, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_checkpoint_files_load_weights_only(tiny, tmp_path):
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=100, checkpoint_every=40), store)
        eng.run()
        steps = [c.step for c in eng.checkpoints]
        assert steps == [0, 40, 80]
        for c in eng.checkpoints:
            data = torch.load(c.path, weights_only=True)
            assert data["step"] == c.step and set(data["model"]) == set(eng.model.state_dict())
        assert [e.step for e in store.load_events(eng.run_id) if e.kind == "checkpoint"] == [0, 40, 80]


@pytest.mark.parametrize("script,params", [("tiny.py", {}), ("seeded_loader.py", {"dropout": 0.1})],
                         ids=["global RNG", "DataLoader(generator=g) and dropout"])
def test_fork_with_same_settings_continues_bit_exactly(tmp_path, script, params):
    """A fork mid-epoch (step 100: tiny's epoch 3, batch 4; seeded_loader's epoch 8, batch 9)
    reproduces its parent's steps exactly, whichever RNG decides the data order."""
    exp = load_experiment(SCRIPTS / script)
    cfg = RunConfig(lr=0.05, momentum=0.9, steps=200, seed=4, checkpoint_every=50, params=params)
    with RunStore(tmp_path) as store:
        parent = TrainingEngine(exp, cfg, store)
        parent.run()
        ck = next(c for c in parent.checkpoints if c.step == 100)
        child = TrainingEngine(exp, parent.config, store, origin=Origin("fork", parent.run_id, ck.path, 100))
        assert child.run() == "finished"
        a, b = store.load_steps(parent.run_id), store.load_steps(child.run_id)
        assert list(b["step"]) == list(range(100, 200))
        assert b["loss"].tobytes() == a["loss"][100:].tobytes()
        assert b["lr"].tobytes() == a["lr"][100:].tobytes()
        info = store.get_run(child.run_id)
        assert info.parent_id == parent.run_id and info.fork_step == 100


def test_fork_with_another_lr_equals_parent_up_to_the_fork(tiny, tmp_path):
    store_dir = str(tmp_path)
    a, b = run_and_fork(store_dir, ["--steps", "160", "--lr", "0.05", "--seed", "3", "--checkpoint-every", "60"],
                        ["1@120", "--lr", "0.005"])
    with RunStore(store_dir) as s:
        assert s.get_run(2).config["seed"] == 3 and s.get_run(2).config["steps"] == 160
    assert b["step"][0] == 120 and len(b["step"]) == 40
    assert b["loss"][0] == a["loss"][120]  # the loss of step 120 is measured before its update
    assert np.all(b["lr"][:, 0] == 0.005) and np.all(a["lr"][:, 0] == 0.05)
    assert b["loss"][1:].tobytes() != a["loss"][121:].tobytes()
    assert main(["run", str(SCRIPTS / "tiny.py"), "--fork", "1@7", "--store", store_dir]) == 1


def test_resume_after_stop_equals_an_uninterrupted_run(tiny, tmp_path):
    ref = TrainingEngine(tiny, RunConfig(lr=0.05, momentum=0.9, steps=300, seed=8))
    ref.run()
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, momentum=0.9, steps=300, seed=8, checkpoint_every=64),
                             store)
        eng.start()
        wait_for(lambda: eng.step >= 150)
        eng.pause()  # a checkpoint is saved at every pause
        wait_for(lambda: eng.state == "paused")
        paused_at = eng.step
        eng.stop()
        eng.join(10)
        assert store.get_run(eng.run_id).status == "stopped"
        ck = next(c for c in eng.checkpoints if c.reason == "pause")
        assert ck.step == paused_at
        res = TrainingEngine(tiny, eng.config, store, origin=Origin("resume", eng.run_id, ck.path, ck.step))
        assert res.run() == "finished"
        assert res.run_id == eng.run_id
        steps = store.load_steps(eng.run_id)
        assert list(steps["step"]) == list(range(300))
        assert steps["loss"].tobytes() == ref.buffer.view()["loss"].tobytes()
        assert store.get_run(eng.run_id).status == "finished"


def test_cli_resume_of_an_interrupted_run(tiny, tmp_path, capsys):
    store_dir = str(tmp_path)
    with RunStore(store_dir) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=200, seed=1, checkpoint_every=50), store)
        eng.run()
        store.set_status(eng.run_id, "interrupted")
    assert main(["resume", "1", "--steps", "260", "--store", store_dir, "--quiet"]) == 0
    assert "from its checkpoint at step 150" in capsys.readouterr().err
    with RunStore(store_dir) as store:
        assert store.get_run(1).steps == 260 and store.get_run(1).status == "finished"


def test_divergence_pauses_and_rollback_restores_the_checkpoint_exactly(tiny, tmp_path):
    ats = [Intervention(150, "set_lr", {"lr": 8.0})]  # far too high for this model
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=5000, checkpoint_every=50, divergence="pause"),
                             store, interventions=ats)
        eng.start()
        wait_for(lambda: eng.state == "paused" or eng.done.is_set())
        assert eng.state == "paused" and eng.detection is not None
        assert 150 <= eng.detection.step <= 160, "caught within a few steps of the too-high LR"
        assert "learning rate" in eng.detection.explanation.lower()
        det_events = [e for e in eng.events if e.kind == "diverged"]
        assert det_events and det_events[-1].data["kind"] == eng.detection.kind
        n_events = len(eng.events)
        eng.rollback(lr_factor=0.1)
        wait_for(lambda: any(e.kind == "rollback" for e in eng.events[n_events:]))
        rb = [e for e in eng.events if e.kind == "rollback"][-1]
        assert rb.data["to_step"] <= 150
        saved = torch.load(rb.data["path"], weights_only=True)
        for name, t in eng.model.state_dict().items():
            assert torch.equal(t, saved["model"][name]), name
        assert rb.data["lr"] == pytest.approx(0.005)
        eng.resume()
        wait_for(lambda: eng.step > rb.step + 30)
        eng.stop()
        eng.join(10)
        v = eng.buffer.view()
        assert v["lr"][rb.step, 0] == pytest.approx(0.005)
        assert np.all(np.isfinite(v["loss"][rb.step:]))


def test_automatic_rollback_mode_recovers_and_logs(tiny, tmp_path):
    ats = [Intervention(120, "set_lr", {"lr": 8.0})]
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=400, checkpoint_every=50, divergence="rollback"),
                             store, interventions=ats)
        assert eng.run() == "finished"
        kinds = [e.kind for e in store.load_events(eng.run_id)]
        assert "diverged" in kinds and "rollback" in kinds
        v = eng.buffer.view()
        assert np.isfinite(v["loss"][-1]) and v["loss"][-1] < 1.0


# ---- roll-back: the state from before the trouble ------------------------------------------------------
def test_headless_rollback_restores_a_checkpoint_from_before_the_change_that_led_to_it(tmp_path, one_thread):
    """A schedule that raises the rate 1 % a step from step 300 makes regression blow up ~200 steps
    later: the roll-back restores the checkpoint before the schedule started (not one on the ramp),
    so the schedule is gone and the run ends well."""
    store = str(tmp_path)
    assert main(["run", "regression", "--steps", "700", "--at", "300:schedule=ExponentialLR:gamma=1.01",
                 "--checkpoint-every", "50", "--on-divergence", "rollback", "--store", store, "--quiet"]) == 0
    with RunStore(store) as s:
        events = s.load_events(1)
        steps = s.load_steps(1)
    change = next(i for i, e in enumerate(events) if e.kind == "set_schedule")
    det = next(e for e in events if e.kind == "diverged")
    rb = next(e for e in events if e.kind == "rollback")
    assert det.step > events[change].step + 50  # the trouble came long after the change
    ckpt = next(i for i, e in enumerate(events) if e.kind == "checkpoint" and e.data["path"] == rb.data["path"])
    assert ckpt < change and rb.data["to_step"] <= events[change].step
    assert rb.data["auto"] is True
    assert np.all(steps["lr"][rb.step:, 0] == pytest.approx(rb.data["lr"]))  # constant: the ramp is undone
    assert steps["loss"][-20:].mean() < 2 * steps["loss"][events[change].step - 20:events[change].step].mean()


def test_rollback_never_restores_a_checkpoint_saved_after_the_detection(tiny, tmp_path):
    """The detection is cleared by a resume sent right after the roll-back (as the banner does):
    the roll-back still answers the detection it was asked about."""
    ats = [Intervention(150, "set_lr", {"lr": 8.0})]
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=2000, checkpoint_every=50, divergence="pause"),
                             store, interventions=ats)
        eng.start()
        wait_for(lambda: any(c.reason == "pause" for c in eng.checkpoints) or eng.done.is_set())
        det = eng.detection
        assert det is not None and eng.checkpoints[-1].step > det.step  # the pause checkpoint, after it
        eng.rollback(lr_factor=0.1)
        eng.resume()
        wait_for(lambda: any(e.kind == "rollback" for e in eng.events))
        eng.stop()
        eng.join(10)
        rb = next(e for e in eng.events if e.kind == "rollback")
        assert rb.data["to_step"] <= 150 < det.step + 1


def test_rollback_with_no_checkpoint_before_the_trouble_is_refused_with_a_reason(tiny, tmp_path):
    ats = [Intervention(30, "set_lr", {"lr": 8.0})]
    with RunStore(tmp_path) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=2000, checkpoint_every=50, divergence="pause"),
                             store, interventions=ats)
        eng.start()
        wait_for(lambda: eng.state == "paused" or eng.done.is_set())
        eng.checkpoints[0].path.unlink()  # the start checkpoint, the only one before step 30
        eng.rollback(lr_factor=0.1)
        wait_for(lambda: any(e.kind == "rejected" for e in eng.events))
        eng.stop()
        eng.join(10)
    msg = next(e for e in eng.events if e.kind == "rejected").data["message"]
    assert "no checkpoint from before the trouble" in msg and "step 30" in msg


# ---- resume: validated before anything is touched; the live lists stay the app's ------------------------
def _stored(store: RunStore, run_id: int) -> tuple:
    steps = store.load_steps(run_id)
    info = store.get_run(run_id)
    return ({k: v.tobytes() for k, v in steps.items()}, [(e.step, e.kind, e.data) for e in store.load_events(run_id)],
            [(p.step, p.loss) for p in store.load_validation(run_id)], info.status, info.steps)


def _damage(path: Path, change) -> None:
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)


DAMAGES = {
    "negative step": lambda d: d.update(step=-5),
    "garbage rng": lambda d: d.update(rng={"python": "garbage"}),
    "garbage epoch rng": lambda d: d.update(epoch_rng=[1, 2, 3]),
    "torch rng of the wrong size": lambda d: d["rng"].update(torch=torch.zeros(7, dtype=torch.uint8)),
    "position past the epoch": lambda d: d.update(batch_in_epoch=10_000),
    "lrs not numbers": lambda d: d.update(lrs=["x"]),
    "another number of groups": lambda d: d.update(lrs=[0.1, 0.1]),
    "schedule garbage": lambda d: d.update(schedule={"start": 3, "state": {"spec": "Nope"}}),
    "model garbage": lambda d: d.update(model={"0.weight": torch.zeros(2)}),
    "guard garbage": lambda d: d.update(guard={"flags": [1, 2]}),
    "time not a number": lambda d: d.update(time="soon"),
    "clip threshold negative": lambda d: d.update(clip_grad_norm=-1.0),
    "scaler garbage": lambda d: d.update(scaler={"scale": "big"}),
    "clipped counts garbage": lambda d: d.update(step_watch={"clipped": -3, "skipped": 0}),
}


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_resume_from_a_damaged_checkpoint_is_refused_and_changes_nothing(tiny, tmp_path, capsys, damage):
    store_dir = str(tmp_path)
    with RunStore(store_dir) as store:
        eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=200, seed=1, checkpoint_every=50), store)
        eng.run()
        store.set_status(eng.run_id, "interrupted")
        _damage(eng.checkpoints[-1].path, DAMAGES[damage])
        before = _stored(store, eng.run_id)
    capsys.readouterr()
    assert main(["resume", "1", "--steps", "260", "--store", store_dir, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err and "step-000000150-periodic.pt" in err, err
    with RunStore(store_dir) as store:
        assert _stored(store, 1) == before


def _resume_last(tiny, store: RunStore, steps: int) -> TrainingEngine:
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=200, seed=1, checkpoint_every=50), store)
    eng.run()
    ck = eng.checkpoints[-1]
    return TrainingEngine(tiny, RunConfig(lr=0.05, steps=steps, seed=1, checkpoint_every=50), store,
                          origin=Origin("resume", eng.run_id, ck.path, ck.step))


def test_resume_keeps_the_event_of_the_checkpoint_it_resumed_from(tiny, tmp_path):
    with RunStore(tmp_path) as store:
        res = _resume_last(tiny, store, 260)
        assert res.origin.step == 150 and res.run() == "finished"
        assert [e.step for e in store.load_events(1) if e.kind == "checkpoint"] == [0, 50, 100, 150, 200, 250]
    # so that step can still be forked
    assert main(["run", str(SCRIPTS / "tiny.py"), "--fork", "1@150", "--steps", "180",
                 "--store", str(tmp_path), "--quiet"]) == 0


def test_a_resumed_run_fills_the_lists_the_app_took_when_it_showed_it(tiny, tmp_path):
    """The app takes ``events`` and ``validation`` before the engine starts, and draws from them."""
    with RunStore(tmp_path) as store:
        res = _resume_last(tiny, store, 260)
        events, validation = res.events, res.validation
        assert res.run() == "finished"
        assert [e.step for e in events if e.kind == "checkpoint"] == [0, 50, 100, 150, 200, 250]
        stored = [p.step for p in store.load_validation(1)]
        assert [p.step for p in validation] == stored and stored[0] < 150 < stored[-1]


def test_a_format_1_checkpoint_still_resumes(tiny, tmp_path):
    """Checkpoints written before the data generators were saved (format 1) resume as they did."""
    ref = TrainingEngine(tiny, RunConfig(lr=0.05, steps=260, seed=1))
    ref.run()
    with RunStore(tmp_path) as store:
        res = _resume_last(tiny, store, 260)

        def old(d):
            d.pop("data_rng")
            d["format"] = 1

        _damage(res.origin.checkpoint, old)
        assert res.run() == "finished"
        assert store.load_steps(1)["loss"].tobytes() == ref.buffer.view()["loss"].tobytes()
