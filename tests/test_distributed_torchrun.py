"""Real torchrun jobs: two ranks, gloo on the CPU. lrviz run steered by lrviz steer (the LR, a pause
longer than lrviz's collective timeout, a roll-back, a stop), a plain DDP loop recorded with
lrviz.track, a rank that raises or is killed, replay and fork of a distributed run.

A job costs three processes that import torch (the agent and two ranks, ~8 s of CPU before a step):
one job shows together what one job can (the multi-node form with the steering, SIGTERM after the
optimizer's settings), each assert saying which behaviour broke.

Each test waits on events (acks, the processes' exits), never on the clock; WAIT only ends a broken
test. ``ranks_in_sync`` (every rank's parameters identical at the end) is what proves a command landed
at the same step on both ranks: one applied a step late on one rank trains other weights there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from store_events import wait_until
from test_live_processes import read_csv, wait_live

from lrviz.cli import main
from lrviz.store.runs import RunStore

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[1]
TINY = str(SCRIPTS / "ddp_tiny.py")
WAIT = 300
#: lrviz's collective timeout in these jobs: a pause outlasts it (heartbeats keep the ranks waiting).
TIMEOUT_S = 4


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LRVIZ_DIST_TIMEOUT": str(TIMEOUT_S)}
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:  # gloo cannot resolve this host's name: use the loopback interface
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return {**env, **extra}


def torchrun(*args: str, launch: tuple[str, ...] = ("--standalone",), **env: str) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free port of its own), or ``launch`` in place
    of ``--standalone``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node=2",
           "--monitor-interval=0.2", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))


def lrviz_job(*args: str, store: Path, **env: str) -> subprocess.Popen:
    return torchrun("-m", "lrviz", *args, "--store", str(store), **env)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def steer(capsys: pytest.CaptureFixture, run_id: int, store: Path, *flags: str) -> list[int]:
    """``lrviz steer RUN FLAGS``; the step each flag's ack names."""
    assert main(["steer", str(run_id), *flags, "--store", str(store)]) == 0
    said = capsys.readouterr().out
    return [int(m) for m in re.findall(r"(?:before step|at step|from step|runs step) (\d+)", said)]


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def announced(proc: subprocess.Popen) -> tuple[str, str, str]:
    """What rank 0 of a job started with --listen says on stderr: its host, and HOST:PORT and token."""
    host = None
    for line in proc.stderr:
        if line.startswith("lrviz: rank 0 of 2 runs on "):
            host = line.split()[-1]
        m = re.search(r"steer it:  lrviz steer (\S+) --token (\S+)", line)
        if m:
            return host, m.group(1), m.group(2)
    raise AssertionError(f"the job ended without saying where it listens ({proc.wait()})")


def trained(store: Path, proc: subprocess.Popen) -> int:
    """The id of the job's run once it is live and has recorded a step (a command sent before the first
    step lands at step 0, and the LR before it would be no trace at all)."""
    run_id = wait_live(store, proc)

    def stepped() -> bool:
        with RunStore(store) as s:
            return s.get_run(run_id).steps >= 1

    wait_until("the first recorded step", stepped, lambda: proc.poll() is None)
    return run_id


def wait_paused_at(store: Path, run_id: int, step: int) -> None:
    def paused_there() -> bool:
        with RunStore(store) as s:
            info = s.get_run(run_id)
        return info.status == "paused" and info.steps == step

    wait_until(f"a pause at step {step}", paused_there)


def finish_well(proc: subprocess.Popen) -> str:
    """Wait for the job to end with status 0; its stderr."""
    status, err = finish(proc)
    assert status == 0, err
    return err


def stop_and_finish(proc: subprocess.Popen, capsys: pytest.CaptureFixture, store: Path, run_id: int) -> int:
    """Steer the job's run to stop and wait for the job to end well; the step the stop landed at."""
    [stopped] = steer(capsys, run_id, store, "--stop")
    finish_well(proc)
    return stopped


def lr_then_stop(proc: subprocess.Popen, capsys: pytest.CaptureFixture, store: Path, lr: str) -> tuple[int, int, int]:
    """Steer the job's run to ``lr``, then stop it; wait for the job to end well. The run, and the
    steps the LR and the stop landed at."""
    try:
        run_id = trained(store, proc)
        [at] = steer(capsys, run_id, store, "--lr", lr)
        stopped = stop_and_finish(proc, capsys, store, run_id)
    finally:
        proc.kill()
    return run_id, at, stopped


def stopped_as_one_run(store: Path, run_id: int, losses: Path, stopped: int) -> tuple[object, list[float]]:
    """A run every rank stopped at step ``stopped``, recorded as the mean of the ranks' own losses (in
    ``losses``), with identical parameters at the end; its record and LR trace."""
    mine = [[float(v) for v in (losses / f"rank{r}.txt").read_text().split()] for r in range(2)]
    assert len(mine[0]) == len(mine[1]) == stopped  # both ranks' loops stopped at the same step
    with RunStore(store) as s:
        info = s.get_run(run_id)
        steps = s.load_steps(run_id)
    assert info.status == "stopped" and info.summary["ranks_in_sync"] is True
    assert info.config["distributed"]["world_size"] == 2
    assert steps["loss"].tolist() == [(a + b) / 2 for a, b in zip(*mine)]  # the mean over ranks, exactly
    return info, steps["lr"][:, 0].tolist()


def multi_node_form() -> tuple[str, ...]:
    """The README's several-machines launch (a c10d rendezvous) with --nnodes=1: every node runs the same
    command; here one, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ("--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=readme")


def steer_address(capsys: pytest.CaptureFixture, address: str, token: str, *flags: str) -> list[int]:
    """``lrviz steer HOST:PORT --token TOKEN FLAGS`` (as from a laptop through an SSH tunnel); the step
    each flag's ack names."""
    assert main(["steer", address, "--token", token, *flags]) == 0
    said = capsys.readouterr().out
    return [int(m) for m in re.findall(r"(?:before step|at step|from step|runs step) (\d+)", said)]


def test_steering_lands_at_the_same_step_on_both_ranks_of_the_multi_node_form_through_rank_0s_address(
        tmp_path, capsys):
    """The LR, a pause longer than lrviz's collective timeout, a step-once, a resume, a checkpoint, a
    roll-back and a stop. The job is launched in the README's several-machines form (a c10d rendezvous,
    --nnodes=1) and steered as from a laptop through a tunnel (rank 0's address and token) as well as
    by run id: one job shows both (they were two jobs, each paying three processes' start)."""
    store, out = tmp_path / "store", tmp_path / "out"
    proc = torchrun("-m", "lrviz", "run", TINY, "--steps", "100000000", "--device", "cpu", "--checkpoint-every",
                    "100", "--listen", "127.0.0.1:0", "--out", str(out), "--store", str(store), "--quiet",
                    launch=multi_node_form())
    try:
        host, address, token = announced(proc)  # rank 0 alone listens, and says where
        assert host == socket.gethostname()
        run_id = trained(store, proc)
        [s1] = steer_address(capsys, address, token, "--lr", "0.0125")
        [paused] = steer(capsys, run_id, store, "--pause")
        time.sleep(2 * TIMEOUT_S)  # paused for longer than lrviz's collective timeout: nothing may time out
        wait_paused_at(store, run_id, paused)  # no rank went on
        [once] = steer(capsys, run_id, store, "--step-once")
        wait_paused_at(store, run_id, paused + 1)  # one step on every rank, then all wait again
        s2, resumed = steer(capsys, run_id, store, "--lr", "0.02", "--resume")
        [saved] = steer(capsys, run_id, store, "--checkpoint")
        [rolled] = steer(capsys, run_id, store, "--rollback")
        [stopped] = steer_address(capsys, address, token, "--stop")
        finish_well(proc)
    finally:
        proc.kill()
    assert s1 < paused == once and paused + 1 == s2 == resumed <= saved <= rolled < stopped
    lrs = [float(r["lr"]) for r in read_csv(out / "metrics.csv")]
    assert len(lrs) == stopped
    assert set(lrs[:s1]) == {0.05} and set(lrs[s1:paused + 1]) == {0.0125} and set(lrs[s2:rolled]) == {0.02}
    assert set(lrs[rolled:]) == {0.02 * 0.1}  # the checkpoint asked for restored, at a tenth of its rate
    doc = run_json(out)
    assert doc["summary"]["ranks_in_sync"] is True
    assert doc["config"]["distributed"]["world_size"] == 2 and doc["config"]["distributed"]["backend"] == "gloo"
    assert doc["config"]["distributed"]["nodes"] == 1, "the multi-node form's run does not say its nodes"
    with RunStore(store) as st:
        [info] = st.list_runs()
    assert info.status == "stopped" and info.summary["ranks_in_sync"] is True  # the store says it as run.json
    events = doc["events"]
    kinds = [(e["kind"], e["step"]) for e in events if e["kind"] != "checkpoint"]
    assert kinds == [("set_lr", s1), ("pause", paused), ("resume", paused), ("pause", paused + 1), ("set_lr", s2),
                     ("resume", s2), ("rollback", rolled), ("stop", stopped)]
    [manual] = [e for e in events if e["kind"] == "checkpoint" and e["data"]["reason"] == "manual"]
    assert manual["step"] == saved and Path(manual["data"]["path"]).exists()  # written by rank 0


def test_the_loss_is_the_mean_over_ranks_and_ranks_in_sync_is_false_when_one_rank_trains_other_weights(tmp_path):
    store, out, losses = tmp_path / "store", tmp_path / "out", tmp_path / "losses"
    losses.mkdir()
    proc = lrviz_job("run", TINY, "--steps", "60", "--device", "cpu", "--out", str(out), "--quiet", store=store,
                     PERTURB_RANK="1", PERTURB_STEP="20", LOSSES_DIR=str(losses))
    finish_well(proc)
    doc = run_json(out)
    assert doc["summary"]["ranks_in_sync"] is False
    assert [e["data"]["kind"] for e in doc["events"] if e["kind"] == "warning"] == ["ranks_out_of_sync"]
    mine = [[float(v) for v in (losses / f"rank{r}.txt").read_text().split()] for r in range(2)]
    recorded = [float(r["loss"]) for r in read_csv(out / "metrics.csv")]
    assert len(recorded) == len(mine[0]) == len(mine[1]) == 60
    assert recorded == [(a + b) / 2 for a, b in zip(*mine)]  # exactly: the mean over ranks


def test_a_tracked_ddp_loop_records_the_mean_loss_over_ranks_and_follows_steering(tmp_path, capsys):
    store, losses = tmp_path / "store", tmp_path / "losses"
    losses.mkdir()
    proc = torchrun(str(SCRIPTS / "ddp_track.py"), str(store), "100000000", str(losses))
    run_id, at, stopped = lr_then_stop(proc, capsys, store, "0.01")
    _, lrs = stopped_as_one_run(store, run_id, losses, stopped)
    assert set(lrs[:at]) == {0.05} and set(lrs[at:]) == {0.01}


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_one_rank_failing_ends_the_run_on_both_with_its_message(tmp_path, how):
    store = tmp_path / "store"
    proc = lrviz_job("run", TINY, "--steps", "100000000", "--device", "cpu", "--quiet", store=store,
                     FAIL_RANK="1", FAIL_STEP="30", FAIL_HOW=how)
    status, err = finish(proc)  # returns: no rank is left hanging
    assert status != 0
    with RunStore(store) as s:
        [info] = s.list_runs()
    assert info.status == "failed"
    if how == "raise":
        assert "rank 1: training step 30 (epoch 2) raised ValueError: rank 1 cannot go on at step 30" in info.error
        assert "lrviz: rank 1: error:" in err  # the failing rank says it too
    else:
        assert re.search(r"rank 1 \(pid \d+ on .+\) of this torchrun job ended without a message", info.error)


def test_a_tracked_loop_that_raises_on_one_rank_is_recorded_failed_with_that_ranks_message(tmp_path):
    store = tmp_path / "store"
    proc = torchrun(str(SCRIPTS / "ddp_track.py"), str(store), "100000000", FAIL_RANK="1", FAIL_STEP="30")
    status, err = finish(proc)
    assert status != 0
    with RunStore(store) as s:
        [info] = s.list_runs()
    assert info.status == "failed"
    assert "rank 1: the training loop raised RuntimeError: rank 1's loop cannot go on at step 30" in info.error


def test_a_distributed_run_replays_identically_a_fork_continues_as_its_parent_and_a_resume_as_itself(tmp_path):
    store = tmp_path / "store"
    first = lrviz_job("run", TINY, "--steps", "90", "--device", "cpu", "--checkpoint-every", "40", "--quiet",
                      store=store)
    finish_well(first)
    replay = lrviz_job("replay", "1", "--quiet", store=store)
    err = finish_well(replay)
    assert "replay 2 of run 1: loss trace identical (90 steps)" in err
    fork = lrviz_job("run", TINY, "--fork", "1@40", "--steps", "90", "--device", "cpu", "--quiet", store=store)
    finish_well(fork)
    with RunStore(store) as s:
        parent, child = s.load_steps(1), s.load_steps(3)
        info = s.get_run(3)
    assert info.parent_id == 1 and info.summary["ranks_in_sync"] is True
    # every rank loaded rank 0's checkpoint (weights, momentum, data position): the same steps follow
    assert child["loss"].tolist() == parent["loss"][40:].tolist()
    resume = lrviz_job("resume", "1", "--steps", "120", "--quiet", store=store)  # from its checkpoint at step 80
    finish_well(resume)
    with RunStore(store) as s:
        again, info = s.load_steps(1), s.get_run(1)
    assert info.status == "finished" and info.steps == 120 and info.summary["ranks_in_sync"] is True
    assert again["loss"][:90].tolist() == parent["loss"].tolist()  # steps 80..89 run again, exactly


def test_a_lightning_ddp_fit_with_the_callback_is_one_run_steered_and_paused_on_both_ranks(tmp_path, capsys):
    """Lightning's own DDP strategy (2 CPU processes, gloo), which joins torchrun's job: every rank's
    LrvizCallback tracks, rank 0 records the mean loss and serves."""
    if importlib.util.find_spec("lightning") is None:  # the ranks import it; here that would cost ~6 s of CPU
        pytest.skip("lightning is not installed")
    store, losses = tmp_path / "store", tmp_path / "losses"
    losses.mkdir()
    proc = torchrun(str(SCRIPTS / "ddp_lightning.py"), str(store), "100000000", str(losses))
    try:
        run_id = trained(store, proc)
        [at] = steer(capsys, run_id, store, "--lr", "0.01")
        [paused] = steer(capsys, run_id, store, "--pause")
        wait_paused_at(store, run_id, paused)  # both ranks wait: neither runs ahead into DDP's reduction
        [resumed] = steer(capsys, run_id, store, "--resume")
        stopped = stop_and_finish(proc, capsys, store, run_id)
    finally:
        proc.kill()
    info, lrs = stopped_as_one_run(store, run_id, losses, stopped)
    assert info.config["trainer"] == "lightning"
    with RunStore(store) as s:
        events = [(e.kind, e.step) for e in s.load_events(run_id)]
    assert at < paused == resumed < stopped
    assert set(lrs[:at]) == {0.05} and set(lrs[at:]) == {0.01}
    assert [k for k in events if k[0] in ("set_lr", "pause", "resume", "stop")] == [
        ("set_lr", at), ("pause", paused), ("resume", paused), ("stop", stopped)]


def test_a_hugging_face_trainer_under_torchrun_is_one_run_steered_at_the_same_step_on_both_ranks(tmp_path, capsys):
    """transformers' Trainer on 2 CPU processes (DDP through accelerate, gloo) with LrvizCallback."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    store = tmp_path / "store"
    proc = torchrun(str(SCRIPTS / "ddp_transformers.py"), str(store), "100000000")
    run_id, at, stopped = lr_then_stop(proc, capsys, store, "0.003")
    used = [[float(v) for v in Path(f"{store}.rank{r}.lrs").read_text().split()] for r in range(2)]
    assert used[0] == used[1] and len(used[0]) == stopped  # every update, the same rate on both ranks
    assert set(used[0][:at]) == {0.01} and set(used[0][at:]) == {0.003}
    with RunStore(store) as s:
        info = s.get_run(run_id)
        lrs = s.load_steps(run_id)["lr"][:, 0].tolist()
    assert info.status == "stopped" and info.summary["ranks_in_sync"] is True
    assert info.config["distributed"]["world_size"] == 2
    assert lrs == used[0]


def test_the_nccl_check_runs_end_to_end_as_a_dry_run_with_gloo():
    """bench/ddp_nccl_check.py --device cpu: every part of the check but the counting (no CUDA here), so
    that the lead's run on a GPU machine does not fail on the script itself."""
    # its MLP is sized for a GPU (~1 GFLOP a step): a few steps on the CPU run every part of the script
    proc = torchrun(str(ROOT / "bench" / "ddp_nccl_check.py"), "--device", "cpu", "--steps", "5", "--warm", "2")
    try:
        out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[:2]] == ["engine", "track"]
    assert all(line.startswith(f"{name:>6}: 0 host syncs in 5 steps") and line.endswith("on 2 rank(s): ok")
               for name, line in zip(("engine", "track"), lines))
    assert lines[2].endswith("CPU (dry run), backend gloo")


def test_momentum_weight_decay_clipping_and_a_schedule_land_at_the_same_step_on_both_ranks_and_sigterm_stops_all(
        tmp_path, capsys):
    """Each changes what every rank's optimizer does from its step on: one applied a step late on one rank
    trains other weights there, and ``ranks_in_sync`` is false (its negative control is the loss-mean test).
    The job then ends by SIGTERM to torchrun (a batch system's time limit, scancel): torchrun passes it to
    every rank, which stop together, and the run is saved stopped, in sync, with its files."""
    store, out = tmp_path / "store", tmp_path / "out"
    proc = lrviz_job("run", TINY, "--steps", "100000000", "--device", "cpu", "--out", str(out), "--quiet",
                     store=store)
    try:
        run_id = trained(store, proc)
        [m] = steer(capsys, run_id, store, "--momentum", "0.5")
        [w] = steer(capsys, run_id, store, "--weight-decay", "0.01")
        [c] = steer(capsys, run_id, store, "--clip-grad-norm", "0.01")  # below the gradients' norm: it clips
        [s] = steer(capsys, run_id, store, "--schedule", "StepLR:step_size=5,gamma=0.5")

        def far_enough() -> bool:
            with RunStore(store) as st:
                return st.get_run(run_id).steps >= s + 20

        wait_until("20 steps of the schedule", far_enough, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGTERM)
        finish(proc)
    finally:
        proc.kill()
    with RunStore(store) as st:
        info = st.get_run(run_id)
    assert info.status == "stopped", f"SIGTERM to torchrun left the run {info.status}: {info.error}"
    assert info.summary["ranks_in_sync"] is True, "the ranks' parameters differ after the steered changes"
    stopped = info.steps
    assert m <= w <= c <= s < stopped
    doc = run_json(out)
    assert doc["summary"]["ranks_in_sync"] is True
    assert doc["config"]["distributed"]["devices"] == ["cpu", "cpu"]
    steered = ("set_hyperparams", "set_clip", "set_schedule")
    events = [(e["kind"], e["step"]) for e in doc["events"] if e["kind"] in steered]
    assert events == [("set_hyperparams", m), ("set_hyperparams", w), ("set_clip", c), ("set_schedule", s)]
    assert [e["step"] >= c for e in doc["events"] if e["kind"] == "clipping"] == [True]  # it did clip
    lrs = [float(r["lr"]) for r in read_csv(out / "metrics.csv")]
    assert set(lrs[:s]) == {0.05} and set(lrs[s:]) <= {0.05 * 0.5 ** k for k in range(64)}
    assert lrs[s:] == sorted(lrs[s:], reverse=True) and len(set(lrs[s:])) >= 4  # halved every 5 steps


@pytest.mark.parametrize("settings", [("--accumulate", "2"), ("--amp", "bf16")])
def test_accumulation_and_mixed_precision_train_through_ddp_on_every_rank(tmp_path, settings):
    """The update path of these settings must go through DistributedDataParallel too (it once used the bare
    model: each rank stepped on its own gradients, and the ranks drifted apart). Clipping takes the same
    path (Engine._update with an UpdateStep, whether set at the start or steered): the momentum/clipping
    test above clips on both ranks and checks ``ranks_in_sync``."""
    store, out = tmp_path / "store", tmp_path / "out"
    proc = lrviz_job("run", TINY, "--steps", "30", "--device", "cpu", *settings, "--out", str(out), "--quiet",
                     store=store)
    finish_well(proc)
    assert run_json(out)["summary"]["ranks_in_sync"] is True
