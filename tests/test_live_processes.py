"""Live runs across real processes: ``lrviz run`` steered by ``lrviz steer``, the app's worker
children stopped, killed and crashed. Each test waits on events (acks, files, exits), never on
the clock; the WAIT ceilings only end a broken test."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrviz.cli import main
from lrviz.config import RunConfig
from lrviz.live.child import ChildRun, WorkerProcess
from lrviz.live.connection import find_live, live_runs
from lrviz.live.steer import connect_to
from lrviz.states import RunState
from lrviz.store.runs import RunStore

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[1]
WAIT = 120
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def lrviz_run(*args: str, store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lrviz", "run", *args, "--store", str(store), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_live(store: Path, proc: subprocess.Popen) -> int:
    """The id of the run once it serves (its connection file is written when its row exists)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lrviz run exited early: {proc.stderr.read()}")
        if (store / "runs.sqlite").exists():
            live = live_runs(store / "runs.sqlite")
            if live:
                return next(iter(live))
        time.sleep(0.05)
    raise AssertionError("the run never became live")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_lrviz_steer_sets_the_lr_of_a_terminal_run_at_the_acked_step(tmp_path, capsys):
    store = tmp_path / "store"
    out = tmp_path / "out"
    proc = lrviz_run(str(SCRIPTS / "tiny.py"), "--steps", "3000000", "--lr", "0.05", "--out", str(out), store=store)
    try:
        run_id = wait_live(store, proc)
        assert main(["steer", str(run_id), "--lr", "0.0125", "--store", str(store)]) == 0
        said = capsys.readouterr().out
        step = int(said.split("from step")[1].split()[0])
        assert "lr 0.0125: accepted: from step" in said
        assert main(["steer", str(run_id), "--lr", "-3", "--store", str(store)]) == 1  # refused before sending
        assert "lrviz: error: learning rate must be a finite number > 0, not '-3'" in capsys.readouterr().err
        assert main(["steer", str(run_id), "--stop", "--store", str(store)]) == 0
        assert proc.wait(WAIT) == 0
    finally:
        proc.kill()
    rows = read_csv(out / "metrics.csv")
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[step - 1] == 0.05 and lrs[step] == 0.0125 and all(x == 0.0125 for x in lrs[step:])
    with RunStore(store) as s:
        info = s.get_run(run_id)
        assert info.status == "stopped"
        assert [e.step for e in s.load_events(run_id) if e.kind == "set_lr"] == [step]
    assert find_live(store / "runs.sqlite", run_id) is None  # its connection file went with it
    assert main(["steer", str(run_id), "--lr", "0.1", "--store", str(store)]) == 1
    assert "is not live: it is stopped" in capsys.readouterr().err


def test_runs_marks_live_runs(tmp_path, capsys):
    store = tmp_path / "store"
    proc = lrviz_run(str(SCRIPTS / "tiny.py"), "--steps", "3000000", store=store)
    try:
        run_id = wait_live(store, proc)
        main(["runs", "--store", str(store)])
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == [str(run_id)]][0]
        assert line.rstrip().endswith("live")
        main(["steer", str(run_id), "--stop", "--store", str(store)])
        proc.wait(WAIT)
    finally:
        proc.kill()
    main(["runs", "--store", str(store)])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == [str(run_id)]][0]
    assert not line.rstrip().endswith("live")


def test_on_divergence_pause_waits_for_a_rollback_from_steer(tmp_path, capsys):
    store = tmp_path / "store"
    out = tmp_path / "out"
    proc = lrviz_run("regression", "--steps", "2000", "--lr", "0.05", "--at", "600:lr=8",
                     "--checkpoint-every", "100", "--on-divergence", "pause", "--out", str(out), store=store)
    try:
        run_id = wait_live(store, proc)
        client, _ = connect_to(str(run_id), store_path=str(store))
        client.close()
        # wait for the guard to pause the run (the state is in the store: 'paused')
        deadline = time.monotonic() + WAIT
        with RunStore(store) as s:
            while s.get_run(run_id).status != "paused":
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
            diverged = [e for e in s.load_events(run_id) if e.kind == "diverged"]
        assert diverged and diverged[0].step >= 600
        assert main(["steer", str(run_id), "--rollback", "--resume", "--store", str(store)]) == 0
        said = capsys.readouterr().out
        to_step = int(said.split("restored the checkpoint of step")[1].split(",")[0])
        assert to_step <= 600  # from before the trouble began
        assert proc.wait(WAIT) == 0
    finally:
        proc.kill()
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 2000
    tail = [float(r["loss"]) for r in rows[-50:]]
    assert all(x == x and x < 1.0 for x in tail)  # finite and trained again after the roll-back


def test_listen_on_tcp_refuses_a_wrong_token_and_obeys_the_right_one(tmp_path, capsys):
    store = tmp_path / "store"
    proc = lrviz_run(str(SCRIPTS / "tiny.py"), "--steps", "3000000", "--listen", "127.0.0.1:0", store=store)
    try:
        run_id = wait_live(store, proc)
        info = find_live(store / "runs.sqlite", run_id)
        assert info.transport == "tcp" and info.address == "127.0.0.1"
        where = f"127.0.0.1:{info.port}"
        assert main(["steer", where, "--token", "f" * 64, "--pause"]) == 1
        assert "refused" in capsys.readouterr().err
        assert main(["steer", where, "--token", info.token, "--pause"]) == 0
        assert "pause: accepted" in capsys.readouterr().out
        assert main(["steer", where, "--token", info.token, "--stop"]) == 0
        assert proc.wait(WAIT) == 0
        err = proc.stderr.read()
        assert f"lrviz steer {where.split(':')[0]}" in err.replace("127.0.0.1", "127.0.0.1") or "steer it" in err
        assert "wrong token" in err
    finally:
        proc.kill()


# ---- the app's children -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forkserver(tmp_path_factory, session_owned):
    """A fork server for this module's forked workers (kept across its tests, as the app keeps its own)."""
    from lrviz.live.forkserver import ForkServer

    if not sys.platform.startswith("linux"):
        pytest.skip("workers are forked on Linux only")
    s = ForkServer(env=ENV, log_path=tmp_path_factory.mktemp("forkserver") / "server.log").start()
    session_owned.append(lambda: {s, s.pid})
    yield s
    s.close()
    s.proc.wait(WAIT)


@pytest.fixture(params=["spawned", "forked"])
def worker(request, tmp_path):
    """A worker spawned as ``python -m lrviz worker``, or forked from a fork server: they behave alike."""
    server = request.getfixturevalue("forkserver") if request.param == "forked" else None
    w = WorkerProcess(log_dir=tmp_path, env=ENV, server=server).start()
    w.ready.result(WAIT)
    assert (w.proc.__class__.__name__ == "ForkedProcess") == (server is not None)
    yield w
    w.signal(signal.SIGKILL)


def spec_for(script: Path, store: Path, **config) -> dict:
    from lrviz.experiment import load_experiment

    exp = load_experiment(script)
    return {"script": str(script), "config": RunConfig(**exp.defaults).merged(config).to_dict(),
            "store": str(store / "runs.sqlite")}


def test_a_worker_describes_a_script_and_reports_a_broken_one(worker, tmp_path):
    exp = worker.inspect(SCRIPTS / "tiny.py").result(WAIT)
    assert exp.defaults["lr"] == 0.05 and exp.params == {"val": True, "n": 512}
    assert exp.accepts_batch_size is True and exp.surfaces == {} and exp.surface() is None
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef build_model(:\n    pass\n")
    with pytest.raises(Exception, match=r"bad.py:3: syntax error"):
        worker.inspect(bad).result(WAIT)
    info = worker.inspect("surface_saddle").result(WAIT)
    assert info.surfaces["default"] == "saddle" and len(info.surface()["z"]) == 120
    assert info.surface({"surface": "rosenbrock"})["name"] == "Rosenbrock's valley"


def test_a_script_hung_in_build_data_is_stopped_from_the_app(worker, tmp_path):
    run = ChildRun(worker, spec_for(SCRIPTS / "hang_in_data.py", tmp_path)).start()
    run.attached.wait(WAIT)
    assert run.state == RunState.PREPARING
    t0 = time.monotonic()
    run.stop()
    assert run.done.wait(WAIT)
    took = time.monotonic() - t0
    assert run.state == RunState.STOPPED
    assert worker.returncode is not None
    print(f"stopped a hung script in {took:.2f} s")


def test_a_worker_killed_mid_run_shows_failed_and_the_store_row_says_so(worker, tmp_path):
    run = ChildRun(worker, spec_for(SCRIPTS / "tiny.py", tmp_path, steps=3_000_000)).start()
    deadline = time.monotonic() + WAIT
    while run.step < 20:
        assert time.monotonic() < deadline and not run.done.is_set()
        run.changed.wait(1.0)
        run.changed.clear()
    worker.signal(signal.SIGKILL)
    assert run.done.wait(WAIT)
    assert run.state == RunState.FAILED and "SIGKILL" in (run.error or "")
    with RunStore(tmp_path) as s:
        info = s.get_run(run.run_id)
        assert info.status == "failed" and "SIGKILL" in info.error


def test_a_segfaulting_script_fails_with_its_signal_and_the_app_carries_on(worker, tmp_path):
    run = ChildRun(worker, spec_for(SCRIPTS / "crash_at_step.py", tmp_path)).start()
    assert run.done.wait(WAIT)
    assert run.state == RunState.FAILED and "SIGSEGV" in run.error
    with RunStore(tmp_path) as s:
        info = s.get_run(run.run_id)
        assert info.status == "failed" and "SIGSEGV" in info.error
    # another worker trains fine afterwards
    w2 = WorkerProcess(log_dir=tmp_path, env=ENV).start()
    ok = ChildRun(w2, spec_for(SCRIPTS / "tiny.py", tmp_path, steps=30)).start()
    assert ok.done.wait(WAIT) and ok.state == RunState.FINISHED and len(ok.buffer) == 30


def test_a_script_that_fails_to_load_is_reported_with_its_line(worker, tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("from torch import nn\n\ndef build_model():\n    return nn.Linear(2, 1)\n\n"
                   "def build_data():\n    return 3\n\nloss_fn = nn.MSELoss()\n")
    spec = spec_for(SCRIPTS / "tiny.py", tmp_path)
    spec["script"] = str(bad)
    run = ChildRun(worker, spec).start()
    assert run.done.wait(WAIT)
    assert run.state == RunState.FAILED
    assert "broken.py:6: build_data returned" in run.error


def test_a_worker_pool_keeps_one_warm_worker_and_hands_it_over(tmp_path):
    from lrviz.live.child import WorkerPool

    pool = WorkerPool(log_dir=tmp_path, env=ENV)
    try:
        spare = pool.spare()
        assert pool.inspect(SCRIPTS / "tiny.py").result(WAIT).name == "tiny"
        assert pool.spare() is spare  # inspecting does not use it up
        run = pool.start_run(spec_for(SCRIPTS / "tiny.py", tmp_path, steps=20))
        assert run.worker is spare
        assert run.done.wait(WAIT) and run.state == RunState.FINISHED and len(run.buffer) == 20
        nxt = pool.spare()
        assert nxt is not spare and nxt.ready.result(WAIT)["devices"][:2] == ["auto", "cpu"]
    finally:
        pool.close()
        for w in (pool._spare,):
            if w is not None:
                w.signal(signal.SIGKILL)
