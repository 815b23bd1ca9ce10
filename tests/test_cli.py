"""The headless command line: run with interventions, outputs, replay, runs, crash safety."""

from __future__ import annotations

import csv
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from forked_cli import lrviz_forked
from store_events import wait_for_commits, wait_for_running_steps, wait_until

from lrviz.cli import main
from lrviz.store.runs import RunStore

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.qt
def test_run_with_interventions_writes_exact_metrics(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "regression", "--steps", "300", "--lr", "0.05", "--at", "100:lr=0.01",
               "--at", "200:schedule=CosineAnnealingLR:T_max=100", "--out", str(out),
               "--store", str(tmp_path / "store"), "--quiet"])
    assert rc == 0
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 300
    assert list(rows[0])[:5] == ["step", "epoch", "time", "lr", "loss"]
    assert [int(r["step"]) for r in rows] == list(range(300))
    lr = np.array([float(r["lr"]) for r in rows])
    assert all(r["lr"] == "0.05" for r in rows[:100])
    assert all(r["lr"] == "0.01" for r in rows[100:200])
    t = np.arange(100)
    cosine = 0.01 * (1 + np.cos(np.pi * t / 100)) / 2
    np.testing.assert_allclose(lr[200:], cosine, rtol=1e-12, atol=0)
    assert lr[200] == 0.01
    evaluated = [r for r in rows if r["val_loss"]]
    assert evaluated and all(float(r["val_loss"]) > 0 for r in evaluated)
    run = json.loads((out / "run.json").read_text())
    kinds = [(e["step"], e["kind"]) for e in run["events"]]
    assert (100, "set_lr") in kinds and (200, "set_schedule") in kinds
    assert run["config"]["lr"] == 0.05
    assert (out / "loss.png").stat().st_size > 5000 and (out / "lr.png").stat().st_size > 5000


def test_replay_is_bit_exact_on_cpu(tmp_path, capsys):
    store = str(tmp_path / "store")
    rc = main(["run", str(SCRIPTS / "tiny.py"), "--steps", "150", "--lr", "0.03", "--seed", "11",
               "--at", "40:lr=0.01", "--at", "90:schedule=StepLR:step_size=10,gamma=0.7",
               "--at", "60:momentum=0.5", "--store", store, "--quiet"])
    assert rc == 0
    capsys.readouterr()
    assert main(["replay", "1", "--store", store, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "identical (150 steps)" in err
    with RunStore(store) as s:
        a, b = s.load_steps(1), s.load_steps(2)
        assert a["loss"].tobytes() == b["loss"].tobytes()
        assert a["lr"].tobytes() == b["lr"].tobytes()
        assert s.get_run(2).name == f"replay of {s.get_run(1).name}"


def test_replay_of_a_stopped_app_style_run_replays_its_live_commands(tmp_path, capsys):
    """Commands sent live (as the app does) are recorded and replayed at the same steps."""
    from lrviz.config import RunConfig
    from lrviz.engine import TrainingEngine
    from lrviz.experiment import load_experiment

    exp = load_experiment(SCRIPTS / "tiny.py")
    with RunStore(tmp_path / "store") as s:
        eng = TrainingEngine(exp, RunConfig(lr=0.05, steps=100_000, seed=2), s)
        eng.start()
        wait_until("step 30", lambda: eng.step >= 30, lambda: eng.is_alive)
        eng.pause()
        wait_until("the pause", lambda: eng.state == "paused", lambda: eng.is_alive)
        eng.set_lr(0.02)
        eng.set_schedule("ExponentialLR:gamma=0.995")
        eng.resume()
        wait_until("step 120", lambda: eng.step >= 120, lambda: eng.is_alive)
        eng.stop()
        eng.join(10)
        n = s.get_run(eng.run_id).steps
    assert main(["replay", "1", "--store", str(tmp_path / "store"), "--quiet"]) == 0
    assert f"identical ({n} steps)" in capsys.readouterr().err


@pytest.mark.qt
def test_runs_lists_and_export_writes_formats(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["run", "regression", "--steps", "20", "--store", store, "--quiet", "--name", "first"]) == 0
    capsys.readouterr()
    assert main(["runs", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert "first" in listing and "finished" in listing and " 20 " in listing
    out = tmp_path / "exp"
    assert main(["export", "first", "--store", store, "--out", str(out), "--format", "csv,json,svg"]) == 0
    assert len(read_csv(out / "metrics.csv")) == 20
    assert (out / "loss.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert main(["export", "nope", "--store", store]) == 1
    assert "no run 'nope'" in capsys.readouterr().err


def lrviz_process(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m lrviz ARGV`` as a real process (stderr captured as text)."""
    return subprocess.Popen([sys.executable, "-m", "lrviz", *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env or dict(os.environ))


@pytest.mark.slow
def test_killed_run_leaves_an_intact_store_marked_interrupted(tmp_path):
    """SIGKILL mid-run: the store opens, passes integrity_check, and keeps every step the writer had
    committed; the writer commits at least every flush interval's worth of the run's own steps."""
    from lrviz.store.writer import FLUSH_INTERVAL

    store = tmp_path / "store"
    db = store / "runs.sqlite"
    proc = lrviz_process("run", str(SCRIPTS / "tiny.py"), "--steps", "10000000", "--store", str(store), "--quiet")
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        run_id = wait_for_running_steps(db, alive)
        committed = wait_for_commits(db, run_id, 3, alive)[-1]  # a commit just happened: kill now
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    with sqlite3.connect(db) as c:
        assert c.execute("pragma integrity_check").fetchone()[0] == "ok"
    with RunStore(store) as s:
        assert s.integrity_ok()
        info = s.get_run(run_id)
        assert info.status == "interrupted"
        steps = s.load_steps(info.id)
        with sqlite3.connect(db) as c:
            chunk_sizes = [n for (n,) in c.execute("SELECT n FROM chunks WHERE run_id=? ORDER BY start_step",
                                                   (run_id,))]
    n = len(steps["loss"])
    assert n == info.steps >= committed  # nothing committed is lost
    assert np.array_equal(steps["step"], np.arange(n))
    # the loss at a kill is at most the steps since the last commit: one chunk holds at most a few flush
    # intervals of the run's own step rate (a busy machine slows the writer and the training alike)
    rate = n / float(steps["time"][-1])
    assert max(chunk_sizes[1:]) <= 4 * FLUSH_INTERVAL * rate + 50, (chunk_sizes, rate)


# --------------------------------------------------------------------------- Ctrl+C


def assert_stopped_and_intact(db: Path, run_id: int) -> int:
    """The run is saved as stopped, its steps complete; the store passes its integrity check."""
    with RunStore(db) as s:
        assert s.integrity_ok()
        info = s.get_run(run_id)
        assert info.status == "stopped", info.status
        steps = s.load_steps(run_id)
        assert np.array_equal(steps["step"], np.arange(info.steps)) and info.steps > 0
        assert "stop" in [e.kind for e in s.load_events(run_id)]
        return info.steps


def interrupt_twice(proc: subprocess.Popen, db: Path) -> tuple[int, str]:
    """Once the run trains and has stored steps: Ctrl+C twice, 50 ms apart; the run id and stderr."""
    try:
        run_id = wait_for_running_steps(db, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)  # the scenario itself: a double press
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    return run_id, err


@pytest.mark.slow
def test_ctrl_c_twice_keeps_the_outputs_and_saves_the_run_stopped(tmp_path):
    """The second press used to land in the middle of saving (or of Qt's import for the plots): a fatal
    error, no outputs, the run left 'running'."""
    store, out = tmp_path / "store", tmp_path / "out"
    proc = lrviz_process("run", str(SCRIPTS / "tiny.py"), "--steps", "10000000", "--store", str(store),
                         "--out", str(out), "--quiet")
    run_id, err = interrupt_twice(proc, store / "runs.sqlite")
    assert proc.returncode == 130, err
    assert "Fatal" not in err and "Traceback" not in err and "terminate" not in err, err
    assert "stopping (Ctrl+C)" in err and f"run {run_id} stopped" in err, err
    n = assert_stopped_and_intact(store / "runs.sqlite", run_id)
    assert len(read_csv(out / "metrics.csv")) == n
    assert json.loads((out / "run.json").read_text())["summary"]["state"] == "stopped"
    assert (out / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_ctrl_c_twice_stops_a_sweep_and_saves_its_current_run(tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    proc = lrviz_process("sweep", str(SCRIPTS / "tiny.py"), "--lrs", "0.01,0.02", "--steps", "10000000",
                         "--store", str(store), "--out", str(out), "--quiet")
    run_id, err = interrupt_twice(proc, store / "runs.sqlite")
    assert proc.returncode == 130, err
    assert "Fatal" not in err and "Traceback" not in err and "terminate" not in err, err
    assert_stopped_and_intact(store / "runs.sqlite", run_id)
    with RunStore(store) as s:
        assert [r.id for r in s.list_runs()] == [run_id]  # the sweep ended: no next rate was started
    rows = read_csv(out / "sweep.csv")
    assert [(r["run_id"], r["state"]) for r in rows] == [(str(run_id), "stopped")]


def stderr_lines(proc: subprocess.Popen) -> queue.Queue:
    """The lines of ``proc``'s stderr as they come, read by a thread (so a wait for one can time out);
    None after the last."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name="test-stderr", daemon=True).start()
    return lines


def test_ctrl_c_four_times_quits_a_step_that_never_returns(tmp_path):
    """A stuck step cannot stop at a step boundary: three more presses quit at once; the run then shows as
    interrupted, as after a crash, and the store is intact. Each press is answered before the next; a
    press left unanswered fails the test (it used to hang it: the main thread waited untimed)."""
    store = tmp_path / "store"
    db = store / "runs.sqlite"
    started = time.monotonic()
    proc = lrviz_process("run", str(ROOT / "tests" / "corpus" / "hangs_in_loss.py"), "--steps", "100",
                         "--store", str(store), "--quiet")
    try:
        run_id = wait_for_running_steps(db, lambda: proc.poll() is None)
        # a note is one handler's os.write: allow it many times what this machine, as loaded as it is
        # now, took to start the process, import torch and train the first steps
        patience = 10 * (time.monotonic() - started)
        lines, notes, rest = stderr_lines(proc), [], []
        for press in range(4):
            proc.send_signal(signal.SIGINT)
            try:
                notes.append(lines.get(timeout=patience))
            except queue.Empty:
                pytest.fail(f"Ctrl+C number {press + 1} unanswered after {patience:.0f} s (10x the start-up); "
                            f"notes so far: {notes}")
        proc.wait(timeout=patience)
        while (line := lines.get(timeout=patience)) is not None:
            rest.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, notes
    assert "stopping (Ctrl+C)" in notes[0] and "still stopping" in notes[1] and "quit without waiting" in notes[3]
    assert "Traceback" not in "".join(rest)
    with RunStore(store) as s:
        assert s.integrity_ok() and s.get_run(run_id).status == "interrupted"


class _StuckEngine:
    """Just what ``train_headless`` uses of an engine, with a step that returns only when stopped; its
    thread receives the Ctrl+C (as the kernel may choose) once the main thread waits for the run."""

    HANG_GUARD_S = 30.0  # ends the test if the press is never acted on; not a bound on how fast

    def __init__(self) -> None:
        self.state, self.buffer, self.step, self.total_steps = "running", None, 0, None
        self.stopped, self.done = threading.Event(), threading.Event()
        self.stopped_in_time = False

    def start(self) -> None:
        threading.Thread(target=self._run, name="lrviz-engine", daemon=True).start()

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        main = threading.main_thread().ident
        # the main thread blocks in Event.wait -> Condition.wait: its innermost frame is "wait" (a few
        # looks apart, so that it is in the lock itself and no longer between two bytecodes)
        seen = 0
        while seen < 3:
            frame = sys._current_frames().get(main)
            seen = seen + 1 if frame is not None and frame.f_code.co_name == "wait" else 0
            time.sleep(0.01)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        self.stopped_in_time = self.stopped.wait(self.HANG_GUARD_S)
        self.state = "stopped"
        self.done.set()


def test_ctrl_c_received_by_another_thread_stops_the_run(capfd):
    """SIGINT may be delivered to any thread (or reach the main thread just before it blocks): Python
    then runs the handler only when the main thread next runs bytecode. The headless run used to wait
    for its engine untimed, so a stuck step made such a press, and every later one, wait forever."""
    from lrviz.cli.common import Interrupts, train_headless

    engine = _StuckEngine()
    with Interrupts().installed() as intr:
        assert train_headless(engine, quiet=True) == "stopped"
    assert engine.stopped_in_time, "the Ctrl+C was acted on only once the engine ended on its own"
    assert intr.requested and "stopping (Ctrl+C)" in capfd.readouterr().err


@pytest.mark.slow
def test_headless_commands_load_qt_only_to_draw(tmp_path):
    """Qt is imported for the plots of --out, after training, and not at all without them. One process
    runs the commands in turn (one torch import, not four), those without --out first: Qt, once
    imported, would stay imported; each line it prints says whether Qt was imported yet and, at its
    first import, which runs were training."""
    code = """
        import json, sys, threading
        from lrviz.cli import main

        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name == "PySide6" and not hasattr(self, "trainers"):
                    self.trainers = [t.name for t in threading.enumerate() if t.name == "lrviz-engine"]
                return None

        watch = Watch()
        sys.meta_path.insert(0, watch)
        for args in json.loads(sys.argv[1]):
            assert main(args) == 0
            print(getattr(watch, "trainers", None), "PySide6" in sys.modules)
    """
    base = ["run", str(SCRIPTS / "tiny.py"), "--steps", "20", "--quiet", "--store", str(tmp_path / "s")]
    commands = [base, ["runs", "--store", str(tmp_path / "s")],
                ["sweep", str(SCRIPTS / "tiny.py"), "--lrs", "0.1", "--steps", "5", "--quiet", "--store",
                 str(tmp_path / "s")],
                [*base, "--out", str(tmp_path / "out")]]
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), json.dumps(commands)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    results = [line for line in p.stdout.splitlines() if line.startswith(("None ", "["))]
    # without --out: never imported; with it: imported once no run was training
    assert results == ["None False", "None False", "None False", "[] True"], p.stdout


# --------------------------------------------------------------------------- paths


@pytest.mark.slow
def test_paths_are_resolved_once_before_the_script_changes_folder(tmp_path):
    """A relative --store and --out, and a script that calls os.chdir on import and in build_data: the
    outputs, the store and its checkpoints stay where the command was started, and a resume from another
    folder finds the checkpoints."""
    work, elsewhere, other = tmp_path / "work", tmp_path / "elsewhere", tmp_path / "other"
    for d in (work, elsewhere, other):
        d.mkdir()
    env = dict(os.environ, LRVIZ_TEST_ELSEWHERE=str(elsewhere))
    script = ROOT / "tests" / "corpus" / "changes_folder.py"
    p = subprocess.run([sys.executable, "-m", "lrviz", "run", str(script), "--steps", "8", "--checkpoint-every",
                        "4", "--store", "store", "--out", "out", "--quiet"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert list(elsewhere.iterdir()) == []
    assert len(read_csv(work / "out" / "metrics.csv")) == 8
    with RunStore(work / "store") as s:
        (info,) = s.list_runs()
        paths = [Path(e.data["path"]) for e in s.load_events(info.id) if e.kind == "checkpoint"]
    assert paths and all(q.is_absolute() and q.is_file() and q.parent == work / "store" / "checkpoints" / "1"
                         for q in paths), paths
    # the resume in a process of its own too (forked: the run above already showed a new interpreter's)
    p = lrviz_forked(["resume", "1", "--steps", "12", "--store", "../work/store", "--quiet"], cwd=other, env=env)
    assert p.returncode == 0, p.stderr
    with RunStore(work / "store") as s:
        assert s.get_run(1).steps == 12 and s.get_run(1).status == "finished"


@pytest.mark.parametrize("args,needle", [
    (["run", "regression", "--lr", "-1"], "learning rate"),
    (["run", "regression", "--optimizer", "adamax"], "unknown optimizer"),
    (["run", "regression", "--at", "x:lr=1"], "step number"),
    (["run", "regression", "--step", "5"], "unrecognized arguments: --step"),  # a typo, not --steps abbreviated
])
def test_bad_settings_exit_1_with_a_message(tmp_path, capsys, args, needle):
    assert main(args + ["--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_an_at_that_a_run_of_epochs_never_reached_is_named(tmp_path, capsys):
    """The length of a run of epochs is known only once it trains: an --at past its end is named at the
    end (a run of --steps refuses it up front, see test_broken_inputs)."""
    rc = main(["run", str(SCRIPTS / "tiny.py"), "--epochs", "1", "--at", "2:lr=0.05", "--at", "100000:lr=0.1",
               "--store", str(tmp_path / "store"), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    with RunStore(tmp_path / "store") as s:
        (info,) = s.list_runs()
        applied = [e.step for e in s.load_events(info.id) if e.kind == "set_lr"]
    assert applied == [2]
    assert err.splitlines() == [f"lrviz: note: --at '100000:lr=0.1' was not applied: the run ended after step "
                                f"{info.steps - 1}"]
