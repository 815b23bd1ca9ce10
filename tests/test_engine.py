"""The training engine: live control from another thread, recording, interventions, staging."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine
from lrviz.errors import ConfigError
from lrviz.experiment import load_experiment
from lrviz.interventions import Intervention, parse_at

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def tiny():
    return load_experiment(SCRIPTS / "tiny.py")


def run_to_end(engine: TrainingEngine, timeout: float = 60) -> str:
    engine.start()
    assert engine.join(timeout), "engine did not finish"
    return engine.state


def wait_for(pred, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.001)


def losses(engine: TrainingEngine) -> np.ndarray:
    return np.array(engine.buffer.view()["loss"])


def test_records_every_step_with_lr_epoch_and_grad_norm(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=100, seed=1))
    assert run_to_end(eng) == "finished"
    v = eng.buffer.view()
    assert list(v["step"]) == list(range(100))
    assert np.all(v["lr"][:, 0] == 0.05)
    assert np.all(np.isfinite(v["loss"])) and np.all(v["grad_norm"] > 0)
    assert v["epoch"][0] == 0 and v["epoch"][-1] == 3  # 512 samples / 16 = 32 steps an epoch
    assert np.all(np.diff(v["time"]) >= 0)
    # validation once per epoch (3 full epochs) plus one at the end of training
    assert [p.step for p in eng.validation] == [31, 63, 95, 99]
    assert eng.validation[-1].loss < eng.validation[0].loss


def test_grad_norm_matches_torch(tiny):
    """The flat-buffer norm equals torch's clip_grad_norm_ on the same gradients."""
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=3, seed=2))
    run_to_end(eng)
    ref = TrainingEngine(tiny, RunConfig(lr=0.05, steps=3, seed=2))
    ref._prepare()
    model, opt = ref.model, ref.optimizer
    norms = []
    for x, y in ref._train_data:
        opt.zero_grad()
        tiny.module.loss_fn(model(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        opt.step()
        if len(norms) == 3:
            break
    np.testing.assert_allclose(eng.buffer.view()["grad_norm"], norms, rtol=1e-5)


def test_same_seed_same_trace_and_other_seed_differs(tiny):
    a = TrainingEngine(tiny, RunConfig(lr=0.05, steps=50, seed=3))
    b = TrainingEngine(tiny, RunConfig(lr=0.05, steps=50, seed=3))
    c = TrainingEngine(tiny, RunConfig(lr=0.05, steps=50, seed=4))
    for e in (a, b, c):
        run_to_end(e)
    assert losses(a).tobytes() == losses(b).tobytes()
    assert losses(a).tobytes() != losses(c).tobytes()


def test_pause_resume_stop_lose_and_repeat_no_step(tiny):
    """Many pauses and resumes from another thread leave the trace equal to an undisturbed run's."""
    ref = TrainingEngine(tiny, RunConfig(lr=0.05, steps=3000, seed=5))
    run_to_end(ref)
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=3000, seed=5))
    eng.start()
    for _ in range(20):
        time.sleep(0.003)
        eng.pause()
        wait_for(lambda: eng.state == "paused")
        n = eng.step
        time.sleep(0.002)
        assert eng.step == n, "a step ran while paused"
        eng.resume()
        wait_for(lambda: eng.state != "paused")  # it saw the resume (a pause right after would hide it)
    eng.stop()
    assert eng.join(10)
    assert eng.state == "stopped"
    v = eng.buffer.view()
    n = len(v["loss"])
    assert 0 < n < 3000
    assert list(v["step"]) == list(range(n))
    assert losses(eng).tobytes() == losses(ref)[:n].tobytes()
    kinds = [e.kind for e in eng.events]
    assert kinds.count("pause") == 20 and kinds.count("resume") == 20 and kinds[-1] == "stop"


def change_while_paused(eng: TrainingEngine, after: int, change, then: int) -> int:
    """Start ``eng``, pause it past step ``after``, ``change()`` it, resume it for ``then`` more steps and
    stop it; returns the first step run after the change."""
    eng.start()
    wait_for(lambda: eng.step > after)
    eng.pause()
    wait_for(lambda: eng.state == "paused")
    k = eng.step
    change()
    eng.resume()
    wait_for(lambda: eng.step > k + then)
    eng.stop()
    eng.join(10)
    return k


def test_lr_set_while_paused_is_the_lr_of_the_next_step(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=100_000, seed=0))
    s = change_while_paused(eng, 20, lambda: eng.set_lr("3e-3"), 10) - 1  # the last step done before
    lr = eng.buffer.view()["lr"][:, 0]
    assert lr[s] == 0.05 and lr[s + 1] == 0.003 and np.all(lr[s + 1:] == 0.003)
    ev = [e for e in eng.events if e.kind == "set_lr"]
    assert ev[0].step == s + 1 and ev[0].data == {"lr": 0.003}


def test_step_once_runs_exactly_one_step(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=1000), start_paused=True)
    eng.start()
    wait_for(lambda: eng.state == "paused")
    assert eng.step == 0
    for k in range(1, 4):
        eng.step_once()
        wait_for(lambda k=k: eng.step == k and eng.state == "paused")
        time.sleep(0.01)
        assert eng.step == k
    eng.stop()
    assert eng.join(10) and eng.state == "stopped"
    assert len(eng.buffer) == 3


def test_pause_blocks_without_spinning(tiny):
    """A paused engine uses (almost) no CPU: it waits on a condition."""
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=1000), start_paused=True)
    eng.start()
    wait_for(lambda: eng.state == "paused")
    t_cpu = time.thread_time()
    wall, cpu0 = time.perf_counter(), time.process_time()
    time.sleep(0.5)
    used = time.process_time() - cpu0 - (time.thread_time() - t_cpu)
    eng.stop()
    eng.join(10)
    assert used < 0.1 * (time.perf_counter() - wall)


def test_stop_is_prompt_inside_a_long_validation():
    exp = load_experiment(SCRIPTS / "slow_val.py")
    eng = TrainingEngine(exp, RunConfig(**exp.defaults))
    eng.start()
    wait_for(lambda: eng.step >= 5)
    time.sleep(0.1)  # now inside the slow validation pass (10,000 batches of 10 ms: 100 s)
    eng.stop()
    assert eng.join(30)  # well before the pass would end by itself
    assert eng.state == "stopped"
    assert eng.validation == []  # the pass was cut short, not finished and recorded


def test_interventions_at_steps_exact(tiny):
    ats = [parse_at("100:lr=0.01"), parse_at("200:schedule=CosineAnnealingLR:T_max=100")]
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=300), interventions=ats)
    run_to_end(eng)
    lr = eng.buffer.view()["lr"][:, 0]
    assert np.all(lr[:100] == 0.05) and np.all(lr[100:200] == 0.01)
    t = np.arange(100)
    np.testing.assert_allclose(lr[200:], 0.01 * (1 + np.cos(np.pi * t / 100)) / 2, rtol=1e-12, atol=0)
    assert lr[200] == 0.01
    assert [(e.step, e.kind) for e in eng.events if e.kind.startswith("set_")] == [
        (100, "set_lr"), (200, "set_schedule")]


def test_set_lr_during_schedule_rescales_the_rest(tiny):
    ats = [Intervention(0, "set_schedule", {"spec": "ExponentialLR:gamma=0.99"}),
           Intervention(50, "set_lr", {"lr": 0.02})]
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=100), interventions=ats)
    run_to_end(eng)
    lr = eng.buffer.view()["lr"][:, 0]
    np.testing.assert_allclose(lr[:50], 0.05 * 0.99 ** np.arange(50), rtol=1e-12)
    assert lr[50] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(lr[50:], 0.02 * 0.99 ** np.arange(50), rtol=1e-12)


def test_set_schedule_mid_run_starts_from_current_lr(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=100_000))

    def change() -> None:
        eng.set_lr(0.04)
        eng.set_schedule("StepLR:step_size=5,gamma=0.5")

    k = change_while_paused(eng, 10, change, 20)
    lr = eng.buffer.view()["lr"][:, 0]
    expect = 0.04 * 0.5 ** (np.arange(20) // 5)
    np.testing.assert_allclose(lr[k:k + 20], expect, rtol=1e-12)


def test_hyperparams_change_mid_run(tiny):
    ats = [Intervention(10, "set_hyperparams", {"momentum": 0.9, "weight_decay": 1e-4})]
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=20), interventions=ats)
    run_to_end(eng)
    g = eng.optimizer.param_groups[0]
    assert g["momentum"] == 0.9 and g["weight_decay"] == 1e-4
    assert [e.kind for e in eng.events if e.step == 10] == ["set_hyperparams"]


def test_bad_commands_are_refused_in_the_callers_thread(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=10))
    for bad in (-1, float("nan"), "abc", 0):
        with pytest.raises(ConfigError):
            eng.set_lr(bad)
    with pytest.raises(ConfigError, match="unknown schedule|CosineAnnealingLR"):
        eng.set_schedule("CosineAnealingLR:T_max=10")
    with pytest.raises(ConfigError, match="momentum"):
        eng.set_hyperparams(momentum=1.5)
    run_to_end(eng)
    assert eng.state == "finished" and not [e for e in eng.events if e.kind.startswith("set_")]


def test_plateau_schedule_steps_on_validation_loss(tiny):
    cfg = RunConfig(lr=0.05, steps=400, eval_every=10,
                    schedule="ReduceLROnPlateau:factor=0.5,patience=0,threshold=10")
    eng = TrainingEngine(tiny, cfg)
    run_to_end(eng)
    lr = eng.buffer.view()["lr"][:, 0]
    reduced = [e for e in eng.events if e.kind == "lr_reduced"]
    assert reduced, "a threshold of 10 (relative) means no validation pass counts as an improvement"
    first = reduced[0]
    assert lr[first.step - 1] == 0.05 and lr[first.step] == 0.025  # the event marks the first step at the new rate


def test_plateau_without_validation_data_is_a_clear_error(tiny):
    cfg = RunConfig(lr=0.05, steps=10, schedule="ReduceLROnPlateau", params={"val": False})
    eng = TrainingEngine(tiny, cfg)
    assert run_to_end(eng) == "failed"
    assert "validation" in str(eng.error)


def test_device_staging_records_the_same_values_as_host_path(tiny):
    """The accelerator path (losses staged on the device, one copy per flush) records the same trace."""
    host = TrainingEngine(tiny, RunConfig(lr=0.05, steps=700, seed=9), stage_on_device=False)
    staged = TrainingEngine(tiny, RunConfig(lr=0.05, steps=700, seed=9), stage_on_device=True)
    run_to_end(host)
    run_to_end(staged)
    a, b = host.buffer.view(), staged.buffer.view()
    assert a["loss"].tobytes() == b["loss"].tobytes()
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-6)
    assert a["lr"].tobytes() == b["lr"].tobytes() and a["epoch"].tobytes() == b["epoch"].tobytes()


@pytest.mark.slow
def test_device_staging_keeps_the_rows_staged_when_the_buffer_grows(tiny, monkeypatch, tmp_path):
    """An epochs-based run starts with room for 4096 rows; staged in blocks of 100 (never flushed by
    time), rows 4000-4095 are still on the 'device' when row 4096 makes the buffer grow."""
    import lrviz.staging as staging_module
    from lrviz.store.runs import RunStore

    monkeypatch.setattr(staging_module, "STAGE_STEPS", 100)
    monkeypatch.setattr(staging_module, "FLUSH_SECONDS", float("inf"))
    cfg = RunConfig(lr=0.01, epochs=130, seed=2, eval_every=None, params={"val": False})  # 4160 steps
    host = TrainingEngine(tiny, cfg, stage_on_device=False)
    run_to_end(host, 120)
    with RunStore(tmp_path) as store:
        staged = TrainingEngine(tiny, cfg, store, stage_on_device=True)
        run_to_end(staged, 120)
        stored = store.load_steps(staged.run_id)
    a, b = host.buffer.view(), staged.buffer.view()
    assert len(b["loss"]) == 4160 and len(staged.buffer._chunks) == 2  # the rows crossed into a second chunk
    assert a["loss"].tobytes() == b["loss"].tobytes()
    assert a["lr"].tobytes() == b["lr"].tobytes() and a["epoch"].tobytes() == b["epoch"].tobytes()
    assert np.all(np.diff(b["time"]) >= 0) and b["time"][0] > 0
    assert stored["lr"].tobytes() == a["lr"].tobytes() and stored["epoch"].tobytes() == a["epoch"].tobytes()


def test_rows_staged_across_a_chunk_boundary_are_kept():
    from lrviz.records import CHUNK_ROWS, StepBuffer

    buf = StepBuffer(groups=1)
    last = CHUNK_ROWS + 20
    for row in range(last):  # rows staged (filled), none published, across the first chunk's end
        buf.write(row, epoch=(1,), time=(row + 1.0,), lr=(0.5,))
    buf.write(0, loss=np.arange(last, dtype=np.float64))
    buf.publish(last)
    v = buf.view()
    assert list(v["time"]) == [row + 1.0 for row in range(last)]
    assert np.all(v["lr"] == 0.5) and np.all(v["epoch"] == 1) and list(v["loss"]) == list(range(last))


def test_nan_loss_stops_as_diverged_with_the_step(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=50.0, optimizer="sgd", steps=2000))
    assert run_to_end(eng) == "diverged"
    v = eng.buffer.view()
    bad = int(np.flatnonzero(~np.isfinite(v["loss"]))[0])
    assert len(v["loss"]) == bad + 1
    assert f"step {bad}" in str(eng.error) and "too high" in str(eng.error).replace("probably too high", "too high")
    assert eng.events[-1].kind == "diverged"


@pytest.mark.slow
def test_buffer_readers_see_consistent_views_while_training(tiny):
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=10_000))
    eng.start()
    # a spinning reader would starve the engine's first-step imports (torch._dynamo) of the GIL
    wait_for(lambda: eng.step > 0)
    errors = []

    def reader():
        while not eng.done.is_set():
            buf = eng.buffer
            if buf is None:
                continue
            v = buf.view()
            n = len(v["step"])
            if not (len(v["loss"]) == len(v["lr"]) == n):
                errors.append("ragged view")
            if n and v["step"][-1] != n - 1:
                errors.append("step column wrong")
            if n and not math.isfinite(float(v["loss"][-1])):
                errors.append("unwritten row visible")
            time.sleep(0.0002)  # read thousands of times, but let the training thread have the GIL

    t = threading.Thread(target=reader)
    t.start()
    eng.join(120)
    t.join()
    assert not errors
    assert len(eng.buffer) == 10_000


def test_range_test_mid_training_restores_weights_and_training_goes_on(tiny):
    """Paused after step s, a range test runs on the live weights; training then continues exactly."""
    ref = TrainingEngine(tiny, RunConfig(lr=0.05, momentum=0.9, steps=120, seed=6))
    ref.run()
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, momentum=0.9, steps=120, seed=6),
                         interventions=[], start_paused=False)
    eng.start()
    wait_for(lambda: eng.step >= 40)
    eng.pause()
    wait_for(lambda: eng.state == "paused")
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    try:
        result = eng.range_test(start=1e-5, end=10, steps=60).result(timeout=60)
        after = {k: v.clone() for k, v in eng.model.state_dict().items()}  # still paused
    finally:
        eng.resume()
    # on weights that already trained a while the curve may never fall: then no suggestion, with a reason
    assert len(result.lrs) > 10 and (result.suggestions.best is not None or result.suggestions.reason)
    assert len(eng.range_test_progress) == len(result.lrs)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert eng.join(60) and eng.state == "finished"
    assert losses(eng).tobytes() == losses(ref).tobytes()
    assert [e.kind for e in eng.events].count("range_test") == 1


def seconds_between(engine: TrainingEngine, first: int, last: int) -> float:
    """The time the run itself recorded between two of its steps."""
    t = engine.buffer.view(first, last + 1)["time"]
    return float(t[-1] - t[0])


def test_pace_slows_the_run_and_stays_steerable(tiny):
    """Paced at 20 steps/s the run's own clock says at most ~20 steps/s, unpaced it steps faster than the
    pace allows, and a stop ends it within a step (counted in steps, so a busy machine slows the bounds
    with the run). The engine is stopped whatever happens: a run left training here would draw from
    torch's global RNG under the next tests of this process."""
    eng = TrainingEngine(tiny, RunConfig(lr=0.05, steps=100_000, pace=20))
    eng.start()
    try:
        wait_for(lambda: eng.step > 0)  # the first step of a process imports torch._dynamo (~1 s)
        n0 = eng.step
        wait_for(lambda: eng.step >= n0 + 40)
        # never faster than asked (2 s for 40 steps): a run that fell behind catches up by at most 0.1 s,
        # and a step's time is recorded after its own work, which a busy machine stretches (0.25 s more)
        assert 40 <= 20 * seconds_between(eng, n0, n0 + 40) + 20 * (0.1 + 0.25)
        n = eng.step
        eng.set_pace(None)
        wait_for(lambda: eng.step > n + 160)
        assert 60 > 20 * seconds_between(eng, n + 100, n + 160) + 3  # faster than the pace would allow
        eng.set_pace(50)
        at_stop = eng.step
    finally:
        eng.stop()
    assert eng.join(20) and eng.state == "stopped"
    assert eng.step <= at_stop + 1  # the paced wait is woken by the stop: no further step
