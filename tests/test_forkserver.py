"""The app's fork server across real processes: a pool's workers are forks of one server that imported
torch once; they stop, die and report like spawned ones; a worker whose env differs at start-up is
spawned; the server goes when its app goes, and the runs it forked stay. Each test waits on events
(answers, exits), never on the clock; WAIT only ends a broken test."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lrviz.cli import main
from lrviz.live.child import WorkerPool, WorkerProcess, describe_exit
from lrviz.live.forkserver import UNKNOWN_EXIT, ForkedProcess, ForkServer
from lrviz.states import RunState
from lrviz.store.runs import RunStore

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")]

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[1]
WAIT = 120
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def torch_mapped_at(pid: int) -> set[str]:
    """Where torch's C++ library lies in ``pid``'s memory (empty: torch is not imported there)."""
    return {line.split()[0] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if line.rstrip().endswith(("/libtorch_cpu.so", "/libtorch_python.so"))}


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (reaped, or a zombie nobody waited for yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_for(pred, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def spec_for(script: Path, store: Path, **config) -> dict:
    from lrviz.config import RunConfig
    from lrviz.experiment import load_experiment

    exp = load_experiment(script)
    return {"script": str(script), "config": RunConfig(**exp.defaults).merged(config).to_dict(),
            "store": str(store / "runs.sqlite")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, session_owned):
    """A fork server shared by this module's tests (as the app keeps one): one torch import."""
    log_path = tmp_path_factory.mktemp("forkserver") / "server.log"
    s = ForkServer(env=ENV, log_path=log_path).start()
    session_owned.append(lambda: {s, s.pid})
    assert s.ready.wait(WAIT) and s.served, log_path.read_text()
    yield s
    s.close()
    s.proc.wait(WAIT)


def test_a_worker_is_a_fork_of_the_server_with_torch_imported_before_its_main(server, tmp_path):
    # the server has imported torch (its library is mapped) and runs one thread: nothing a fork loses
    where = torch_mapped_at(server.pid)
    assert where and len(os.listdir(f"/proc/{server.pid}/task")) == 1
    w = WorkerProcess(log_dir=tmp_path, env=ENV, server=server).start()
    try:
        assert isinstance(w.proc, ForkedProcess) and w.ready.result(WAIT)["pid"] == w.pid
        assert parent_of(w.pid) == server.pid
        # never exec'd (the server's command line) and torch at the server's address: a process that
        # imported torch itself would have it elsewhere (address space randomization)
        assert cmdline(w.pid) == cmdline(server.pid)
        if Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0":
            assert torch_mapped_at(w.pid) == where
        assert w.inspect(SCRIPTS / "tiny.py").result(WAIT).name == "tiny"
    finally:
        w.close()
    assert w.proc.wait(WAIT) == 0 and w.returncode == 0


def test_two_runs_in_a_row_import_torch_once(tmp_path):
    pool = WorkerPool(log_dir=tmp_path, env=ENV)
    try:
        servers, workers = set(), []
        for _ in range(2):
            spare = pool.spare()
            spare.ready.result(WAIT)
            servers.add(pool.server.pid)
            assert parent_of(spare.pid) == pool.server.pid and cmdline(spare.pid) == cmdline(pool.server.pid)
            assert torch_mapped_at(spare.pid) == torch_mapped_at(pool.server.pid)
            run = pool.start_run(spec_for(SCRIPTS / "tiny.py", tmp_path, steps=20))
            assert run.worker is spare
            assert run.done.wait(WAIT) and run.state == RunState.FINISHED and len(run.buffer) == 20
            assert spare.returncode == 0
            workers.append(spare.pid)
        assert len(servers) == 1 and len(set(workers)) == 2  # one server imported torch; two forks trained
    finally:
        pool.close()
        if pool._spare is not None:
            pool._spare.signal(signal.SIGKILL)
        pool.server.proc.wait(WAIT)


def test_a_worker_with_another_start_up_env_is_spawned_and_the_log_says_so_once(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lrviz.live.forkserver")
    other = {**ENV, "OMP_NUM_THREADS": "2"}
    spawned = [WorkerProcess(log_dir=tmp_path, env=other, server=server).start() for _ in range(2)]
    try:
        for w in spawned:
            assert isinstance(w.proc, subprocess.Popen) and w.ready.result(WAIT)
            assert parent_of(w.pid) == os.getpid()
        said = [r.getMessage() for r in caplog.records if "spawning workers" in r.getMessage()]
        assert len(said) == 1 and "OMP_NUM_THREADS" in said[0]
        # what else makes a fork unlike a fresh process: another python, the server gone
        assert "is not the fork server's" in server.refuses("/usr/bin/python3", ENV)
        assert server.refuses(server.python, {**ENV, "LRVIZ_HOME": str(tmp_path)}) is None  # read at run time
    finally:
        for w in spawned:
            w.close()
            w.proc.wait(WAIT)


def test_a_forked_worker_gets_the_asked_env_and_working_directory(server, tmp_path):
    script = tmp_path / "where.py"
    script.write_text(textwrap.dedent("""\
        import os
        from torch import nn

        DEFAULTS = {"lr": 0.1, "steps": 5}
        PARAMS = {"cwd": os.getcwd(), "probe": os.environ.get("LRVIZ_TEST_PROBE", "")}

        def build_model():
            return nn.Linear(1, 1)

        def build_data():
            return [], []

        loss_fn = nn.MSELoss()
        """))
    here = tmp_path / "elsewhere"
    here.mkdir()
    w = WorkerProcess(log_dir=tmp_path, env={**ENV, "LRVIZ_TEST_PROBE": "seen"}, server=server)
    old = os.getcwd()
    os.chdir(here)
    try:
        w.start()
    finally:
        os.chdir(old)
    try:
        assert isinstance(w.proc, ForkedProcess)
        assert w.inspect(script).result(WAIT).params == {"cwd": str(here), "probe": "seen"}
    finally:
        w.close()
        w.proc.wait(WAIT)


def test_a_fork_asked_of_a_server_that_dies_first_is_spawned_on_the_same_pipes(tmp_path):
    s = ForkServer(env=ENV, log_path=tmp_path / "forkserver.log").start()
    os.kill(s.pid, signal.SIGSTOP)  # whether or not it has imported torch yet, it reads nothing now
    w = WorkerProcess(log_dir=tmp_path, env=ENV, server=s).start()
    assert w.inspect(SCRIPTS / "tiny.py") is not None  # asked before the worker exists: waits in its pipe
    assert isinstance(w.proc, ForkedProcess) and w.pid is None
    os.kill(s.pid, signal.SIGKILL)
    try:
        assert w.ready.result(WAIT) and w.proc.popen is not None and parent_of(w.pid) == os.getpid()
        assert w.inspect(SCRIPTS / "tiny.py").result(WAIT).name == "tiny"
    finally:
        w.close()
        assert w.proc.wait(WAIT) == 0
    assert s.dead.is_set() and s.proc.returncode == -signal.SIGKILL


def test_the_pool_starts_another_server_when_its_server_dies(tmp_path):
    pool = WorkerPool(log_dir=tmp_path, env=ENV)
    try:
        first = pool.spare()
        first.ready.result(WAIT)
        dead = pool.server
        os.kill(dead.pid, signal.SIGKILL)
        assert dead.dead.wait(WAIT)
        nxt = pool.take()  # the spare goes on; a new one comes from a new server
        assert nxt is first
        wait_for(lambda: pool._spare is not None, "no new spare")
        again = pool._spare
        again.ready.result(WAIT)
        assert pool.server is not dead and parent_of(again.pid) == pool.server.pid
        # the worker whose server died still answers, and its end is still seen (how it ended is lost)
        assert first.inspect(SCRIPTS / "tiny.py").result(WAIT).name == "tiny"
        first.close()
        assert first.exited.wait(WAIT) and first.returncode == UNKNOWN_EXIT
        assert "unknown" in describe_exit(first.returncode)
    finally:
        pool.close()
        if pool._spare is not None:
            pool._spare.signal(signal.SIGKILL)
        pool.server.proc.wait(WAIT)


APP = r"""
import json, os, sys, time
from lrviz.live.child import WorkerPool
pool = WorkerPool(log_dir=sys.argv[2], env=dict(os.environ))
spec = json.loads(sys.argv[1])
run = pool.start_run(spec)
while (run.step < 5 or run.run_id is None) and not run.done.is_set():
    run.changed.wait(1.0); run.changed.clear()
print(json.dumps({"server": pool.server.pid, "worker": run.worker.pid, "run": run.run_id, "step": run.step}),
      flush=True)
time.sleep(600)
"""


def test_the_server_exits_with_its_app_and_the_run_it_forked_trains_on(tmp_path, capsys):
    spec = spec_for(SCRIPTS / "tiny.py", tmp_path, steps=3_000_000)
    app = subprocess.Popen([sys.executable, "-c", APP, json.dumps(spec), str(tmp_path)], cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, text=True)
    seen: dict = {}
    try:
        seen = json.loads(app.stdout.readline())
        assert seen["step"] >= 5 and parent_of(seen["worker"]) == seen["server"]
        app.kill()
        app.wait(WAIT)
        wait_for(lambda: gone(seen["server"]), "the fork server outlived its app")
        assert not gone(seen["worker"])  # the run the app left goes on, and can still be steered
        assert main(["steer", str(seen["run"]), "--stop", "--store", str(tmp_path)]) == 0
        wait_for(lambda: gone(seen["worker"]), "the run did not stop")
        with RunStore(tmp_path) as s:
            assert s.get_run(seen["run"]).status == "stopped"
    finally:
        app.kill()
        if seen.get("worker") and not gone(seen["worker"]):  # an orphan now: no leak check sees it
            os.kill(seen["worker"], signal.SIGKILL)


def test_lrviz_workers_spawn_turns_the_fork_server_off(tmp_path, monkeypatch):
    assert WorkerPool(log_dir=tmp_path).fork is True
    monkeypatch.setenv("LRVIZ_WORKERS", "spawn")
    pool = WorkerPool(log_dir=tmp_path)
    assert pool.fork is False and pool._forkserver() is None and pool.server is None


def test_a_pool_off_linux_spawns_and_says_why_once(tmp_path, monkeypatch, caplog):
    import lrviz.live.forkserver as fs

    caplog.set_level(logging.INFO, logger="lrviz.live.forkserver")
    monkeypatch.setattr(fs.sys, "platform", "darwin")
    monkeypatch.setattr(fs, "_said", set())
    pool = WorkerPool(log_dir=tmp_path)
    assert pool._forkserver() is None and pool._forkserver() is None and pool.server is None
    said = [r.getMessage() for r in caplog.records]
    assert said == ["spawning workers: forking workers is only done on Linux, not darwin"]


PRELOAD_CHECK = r"""
import sys
from lrviz.live.forkserver import PRELOAD
for name in PRELOAD:
    __import__(name)
before = set(sys.modules)
from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine
from lrviz.experiment import load_experiment
exp = load_experiment(sys.argv[1])
eng = TrainingEngine(exp, RunConfig(**exp.defaults).merged({"steps": 20, "epochs": None}), None)
eng.run()
print(eng.state)
print("\n".join(sorted(set(sys.modules) - before)))
"""


def test_what_the_server_preloads_leaves_a_run_nothing_heavy_to_import():
    # torch imports torch._dynamo (and sympy with it, ~1.3 s of CPU) when a process builds its first
    # optimizer: a fork that had to import it would lose most of what forking saves
    out = subprocess.run([sys.executable, "-c", PRELOAD_CHECK, str(SCRIPTS / "tiny.py")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    state, *new = out.stdout.split()
    assert state == "finished"
    heavy = [m for m in new if m.startswith(("torch._dynamo", "torch._inductor", "torch.distributed", "sympy"))]
    assert not heavy, heavy
