"""lrviz.distributed in one process: sharding the data per rank, the exchange at agreed steps under a
one-rank process group, faults told across ranks, the config's record. The real multi-process jobs
(torchrun, two ranks) are in test_distributed_torchrun.py."""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
import types
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from lrviz.config import RunConfig
from lrviz.control import RunControl, Stopped
from lrviz.distributed import (
    MAX_INTERVAL,
    SYNC_S,
    Distributed,
    EpochSampled,
    FaultWatcher,
    FollowerControl,
    StepExchange,
    is_peer_loss,
    remote_error,
    shard,
)
from lrviz.engine import TrainingEngine
from lrviz.errors import ConfigError, LrvizError, ScriptError
from lrviz.experiment import load_experiment
from lrviz.records import StepBuffer

SCRIPTS = Path(__file__).parent / "scripts"

SEQUENTIAL = '''
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

def build_data(batch_size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 3, generator=g)
    y = x[:, :1] - x[:, 1:2]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)

loss_fn = nn.MSELoss()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank():
    """A one-rank gloo process group in this process (what lrviz.track meets under torchrun, world 1)."""
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    made: list[Distributed] = []
    yield made
    for d in made:
        d.close()
    if tdist.is_initialized():
        tdist.destroy_process_group()


def _dist(made: list[Distributed]) -> Distributed:
    d = Distributed.attach(torch.device("cpu"))
    made.append(d)
    return d


# ---- the data of each rank ------------------------------------------------------------------------
def _samples(loader) -> list[int]:
    return [int(i) for xb, in loader for i in xb.view(-1)]


def test_a_shuffled_loader_is_shared_out_like_lightning_every_rank_as_many_batches_reseeded_each_epoch():
    ds = TensorDataset(torch.arange(51))
    epoch = {"n": 0}
    parts = [shard(DataLoader(ds, batch_size=8, shuffle=True), r, 2, seed=7, epoch=lambda: epoch["n"])
             for r in range(2)]
    assert all(isinstance(p, EpochSampled) for p in parts)
    assert len(parts[0]) == len(parts[1]) == 4  # 26 samples each (one padded), 8 a batch
    first = [_samples(p) for p in parts]
    assert sorted(set(first[0]) | set(first[1])) == list(range(51))  # together, the whole dataset
    for r in range(2):  # the very order DistributedSampler gives for this seed and epoch
        ref = DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=7)
        ref.set_epoch(0)
        assert first[r] == list(ref)
    epoch["n"] = 1
    second = [_samples(p) for p in parts]
    assert second[0] != first[0]  # set_epoch: another order in the next epoch
    ref = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=7)
    ref.set_epoch(1)
    assert second[0] == list(ref)


def test_an_unshuffled_loader_stays_in_order_and_a_list_of_batches_is_dealt_out():
    ds = TensorDataset(torch.arange(10))
    part = shard(DataLoader(ds, batch_size=2), 1, 2, seed=0, epoch=lambda: 0)
    assert _samples(part) == [1, 3, 5, 7, 9]
    batches = [("b", i) for i in range(5)]
    assert shard(batches, 0, 2, seed=0, epoch=lambda: 0) == [("b", 0), ("b", 2)]
    assert shard(batches, 1, 2, seed=0, epoch=lambda: 0) == [("b", 1), ("b", 3)]  # as many as rank 0


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(4))


def test_data_lrviz_cannot_share_out_is_refused_with_what_to_do(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SEQUENTIAL)
    exp = load_experiment(script)
    for data in (DataLoader(_Stream()), {"x": 1}, [("only one batch",)]):
        with pytest.raises(ScriptError) as info:
            shard(data, 0, 2, seed=0, epoch=lambda: 0, script=exp)
        assert str(script) in str(info.value)
        assert "rank" in str(info.value)
    with pytest.raises(ScriptError, match=r"build_data\(rank=0, world_size=1\)"):
        shard(DataLoader(_Stream()), 0, 2, seed=0, epoch=lambda: 0, script=exp)


def test_a_build_data_that_takes_rank_and_world_size_gets_them_and_shards_by_itself(tmp_path):
    script = tmp_path / "own.py"
    script.write_text(SEQUENTIAL.replace("def build_data(batch_size=8):", "def build_data(batch_size=8, rank=0, "
                                         "world_size=1):\n    seen.append((rank, world_size))") + "\nseen = []\n")
    exp = load_experiment(script)
    place = types.SimpleNamespace(rank=1, world_size=3)
    train, val = Distributed.make_data(place, exp, 8, None, seed=0, epoch=lambda: 0)
    assert exp.module.seen == [(1, 3)]
    assert isinstance(train, DataLoader) and not isinstance(train, EpochSampled)  # left as the script made it


# ---- the exchange at agreed steps ----------------------------------------------------------------------
def _exchange(dist: Distributed, control: RunControl | None = None, **kw) -> tuple[StepExchange, list]:
    checked: list = []
    ex = StepExchange(dist, StepBuffer(groups=1), None, control or RunControl(),
                      check=lambda *rows: checked.append(rows), **kw)
    return ex, checked


def test_rows_wait_for_the_agreed_step_and_arrive_as_the_mean_over_ranks(one_rank):
    dist = _dist(one_rank)
    control = RunControl()
    ex, checked = _exchange(dist, control)
    assert control.attention  # the loop's first step is an agreed one
    ex.attend(lambda k, d: d, lambda: 0, on_pause=lambda: None, on_resume=lambda: None, on_reject=lambda k, e: None)
    assert ex.at == 1 and not control.attention
    losses = [0.5, 0.25, 0.125]
    for i, v in enumerate(losses):
        ex.stage(0, float(i), torch.tensor(v), torch.tensor(4.0), [0.1])
    assert len(ex.buffer) == 0  # nothing read or written per step
    assert control.attention  # the agreed step was reached: the loop's next attend is the exchange
    ex.attend(lambda k, d: d, lambda: 3, on_pause=lambda: None, on_resume=lambda: None, on_reject=lambda k, e: None)
    v = ex.buffer.view()
    assert v["loss"].tolist() == losses and v["grad_norm"].tolist() == [2.0] * 3
    assert checked[0][0] == 0 and checked[0][1].tolist() == losses


def test_a_command_is_applied_at_the_agreed_step_and_its_ack_names_that_step(one_rank):
    dist = _dist(one_rank)
    control = RunControl()
    ex, _ = _exchange(dist, control)
    applied = []
    attend = dict(on_pause=lambda: None, on_resume=lambda: None, on_reject=lambda k, e: None)
    ex.attend(lambda k, d: applied.append((k, d)) or d, lambda: 0, **attend)
    ex.at = 5  # as rank 0 would agree at a high step rate
    fut: Future = control.enqueue("set_lr", {"lr": 0.3}, Future())
    for s in range(1, 5):  # a command between two agreed steps waits for the next one
        ex.attend(lambda k, d: applied.append((k, d)) or d, lambda s=s: s, **attend)
        assert not applied and not fut.done() and not control.attention
    ex.attend(lambda k, d: applied.append((k, d)) or d, lambda: 5, **attend)
    assert applied == [("set_lr", {"lr": 0.3})]
    assert fut.result(0)["step"] == 5


def test_a_stop_ends_the_loop_at_the_agreed_step_and_a_refused_command_says_why(one_rank):
    dist = _dist(one_rank)
    control = RunControl()
    ex, _ = _exchange(dist, control)
    rejected = []

    def apply(kind, data):
        raise ConfigError("not here")

    bad = control.enqueue("set_schedule", {"spec": "x"}, Future())
    stop = control.enqueue("stop", {}, Future())
    with pytest.raises(Stopped):
        ex.attend(apply, lambda: 0, on_pause=lambda: None, on_resume=lambda: None,
                  on_reject=lambda k, e: rejected.append((k, str(e))))
    assert rejected == [("set_schedule", "not here")]
    assert "not here" in str(bad.exception(0))
    assert stop.result(0)["step"] == 0
    other = RunControl()
    ex, _ = _exchange(dist, other)
    unsendable = other.enqueue("range_test", {"future": Future()}, Future())  # its data cannot travel
    ex.attend(lambda k, d: d, lambda: 0, on_pause=lambda: None, on_resume=lambda: None, on_reject=lambda k, e: None)
    assert "not available in a distributed run" in str(unsendable.exception(0))


def test_pause_waits_in_the_exchange_with_heartbeats_until_resumed(one_rank):
    dist = _dist(one_rank)
    control = RunControl()
    ex, _ = _exchange(dist, control)
    ex.heartbeat = 0.05
    seen = []
    control.pause()
    resumed = threading.Event()

    def on_pause():
        seen.append("pause")
        threading.Thread(target=lambda: (resumed.wait(), control.resume())).start()

    def on_resume():
        seen.append("resume")

    before = ex.exchanges
    t = threading.Thread(target=ex.attend, args=(lambda k, d: d, lambda: 0),
                         kwargs=dict(on_pause=on_pause, on_resume=on_resume, on_reject=lambda k, e: None))
    t.start()
    while ex.exchanges < before + 4:  # heartbeats: exchanges go on while paused
        t.join(0.01)
    assert seen == ["pause"] and t.is_alive()
    resumed.set()
    t.join(60)
    assert seen == ["pause", "resume"] and not t.is_alive()


def test_rank_0_agrees_on_steps_at_its_rate_every_step_during_a_step_once_and_at_each_checkpoint(one_rank):
    dist = _dist(one_rank)
    control = RunControl()
    ex, _ = _exchange(dist, control, align=1000)
    now = time.perf_counter
    assert ex._next_at(0) == 1  # no rate measured yet: the next step
    ex._rate_at = (-10**9, now() - 1.0)  # about 1e9 steps a second
    assert ex._next_at(0) == MAX_INTERVAL
    ex._rate_at = (-10**9, now() - 1.0)
    assert ex._next_at(900) == 1000  # never past a periodic checkpoint's step
    ex._rate_at = (0, now() - 1.0)  # 1000 steps a second: about SYNC_S seconds of steps
    assert 50 <= ex._next_at(1000) - 1000 <= 1000 * SYNC_S
    control.step_once()
    assert ex._next_at(1001) == 1002


def test_publish_drops_what_was_not_reduced_and_waits_on_nobody(one_rank):
    dist = _dist(one_rank)
    ex, _ = _exchange(dist)
    ex.stage(0, 0.0, torch.tensor(1.0), None, [0.1])
    before = ex.exchanges
    ex.publish(0.0)
    assert ex.exchanges == before and len(ex.buffer) == 0
    assert ex.flush(0.0) is None  # nothing left: no collective either
    assert ex.exchanges == before


# ---- the engine under a process group ------------------------------------------------------------------
def test_a_run_on_one_rank_records_what_a_run_in_one_process_records(one_rank, tmp_path, one_thread):
    script = tmp_path / "seq.py"
    script.write_text(SEQUENTIAL)
    exp = load_experiment(script)
    cfg = RunConfig(lr=0.05, optimizer="sgd", momentum=0.9, steps=40, seed=3, device="cpu")
    alone = TrainingEngine(exp, cfg)
    assert alone.run() == "finished"
    ranked = TrainingEngine(exp, cfg, distributed=_dist(one_rank))
    assert ranked.run() == "finished"
    a, b = alone.buffer.view(), ranked.buffer.view()
    for col in ("loss", "grad_norm", "lr", "epoch"):
        assert np.array_equal(a[col], b[col]), col
    assert ranked.summary()["ranks_in_sync"] is True
    assert ranked.config.distributed == {"world_size": 1, "backend": "gloo", "devices": ["cpu"],
                                         "hosts": [socket.gethostname()], "nodes": 1}
    assert "ranks_in_sync" not in alone.summary()
    fut = ranked.submit("range_test", {})
    assert "one process" in str(fut.exception(0))


def test_accumulation_under_ddp_reduces_once_per_update_and_records_what_one_process_records(
        one_rank, tmp_path, one_thread, monkeypatch):
    """With accumulate N, every micro-batch's backward but an update's last runs under DDP's no_sync
    (the gradients are all-reduced once per update, not N times), including an update cut short
    where the epoch's batches run out; the record equals the same run in one process."""
    entered = []
    real = torch.nn.parallel.DistributedDataParallel.no_sync

    def counting(self):
        entered.append(1)
        return real(self)

    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "no_sync", counting)
    script = tmp_path / "seq.py"
    script.write_text(SEQUENTIAL)
    exp = load_experiment(script)
    # 12 batches an epoch: updates of 5, 5 and 2 micro-batches (the last cut short), over 2 epochs
    cfg = RunConfig(lr=0.05, optimizer="sgd", momentum=0.9, steps=6, seed=3, device="cpu", accumulate=5)
    alone = TrainingEngine(exp, cfg)
    assert alone.run() == "finished"
    assert entered == []
    ranked = TrainingEngine(exp, cfg, distributed=_dist(one_rank))
    assert ranked.run() == "finished"
    assert len(entered) == 2 * (4 + 4 + 1)
    a, b = alone.buffer.view(), ranked.buffer.view()
    for col in ("loss", "grad_norm", "lr", "epoch"):
        assert np.array_equal(a[col], b[col]), col
    assert ranked.summary()["ranks_in_sync"] is True


# ---- faults told across ranks ---------------------------------------------------------------------------
def test_a_ranks_own_failure_is_reported_and_a_peers_failure_is_told_with_its_message(one_rank):
    dist = _dist(one_rank)
    own = ScriptError("training step 3 raised ValueError: x", "/s.py", 12)
    assert dist.failed(own) is own
    assert dist.fault()["message"] == str(own)
    dist.kv.set(dist._key("fault"), '{"rank": 1, "message": "m", "path": "/s.py", "line": 9, '
                '"detail": "training step 5 raised KeyError: k"}')
    lost = LrvizError("internal error in lrviz")
    lost.__cause__ = RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1")
    told = dist.failed(lost)
    assert isinstance(told, ScriptError) and told.line == 9
    assert str(told) == "/s.py:9: rank 1: training step 5 raised KeyError: k"


def test_what_counts_as_a_peer_gone_and_how_a_remote_error_reads():
    inner = RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    outer = ScriptError("training step 2: loss_fn raised RuntimeError", "/s.py", 3)
    outer.__cause__ = inner
    assert is_peer_loss(outer)
    assert not is_peer_loss(ScriptError("training step 2 raised ValueError: bad shape", "/s.py", 3))
    assert not is_peer_loss(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert str(remote_error({"rank": 3, "message": "boom"})) == "rank 3: boom"


def test_the_watcher_calls_back_once_for_another_ranks_fault_never_for_its_own():
    store = tdist.HashStore()
    got: list = []
    called = threading.Event()
    fake = types.SimpleNamespace(rank=0, fault=lambda: Distributed.fault(fake_self))
    fake_self = types.SimpleNamespace(kv=store, _key=lambda name: "p/" + name)
    store.set("p/fault", '{"rank": 0, "message": "mine"}')
    w = FaultWatcher(fake, lambda f: (got.append(f), called.set()))
    w.start()
    assert not called.wait(4 * FaultWatcher.POLL_S) and not got  # its own report: no callback
    store.set("p/fault", '{"rank": 1, "message": "theirs"}')
    assert called.wait(60)
    assert got == [{"rank": 1, "message": "theirs"}]
    w.stop()


def test_a_rank_other_than_0_takes_no_commands_and_ignores_its_own_pause():
    control = FollowerControl()
    fut = control.enqueue("set_lr", {"lr": 0.1}, Future())
    assert "rank 0" in str(fut.exception(0))
    control.pause()
    control.stop()
    assert not control.pause_requested and not control.stop_requested


def test_the_distributed_record_is_kept_in_a_stored_config_and_absent_from_one_process_runs():
    assert "distributed" not in RunConfig().to_dict()
    rec = {"world_size": 2, "backend": "gloo", "devices": ["cpu", "cpu"], "hosts": ["h"], "nodes": 1}
    cfg = RunConfig.from_dict({**RunConfig().to_dict(), "distributed": rec})
    assert cfg.validated().to_dict()["distributed"] == rec
    assert math.isfinite(cfg.validated().lr)


def test_track_on_one_rank_only_is_decided_once_for_all_ranks_without_waiting_for_a_group(monkeypatch):
    """A loop that calls lrviz.track on rank 0 only must not wait for a group the others never join."""
    import lrviz.distributed as d

    store = tdist.HashStore()
    monkeypatch.setattr(d, "_default_store", lambda: store)
    monkeypatch.setattr(tdist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(d, "_joins", iter([0, 0, 1, 1]))
    assert d.every_rank_tracks(timeout=0.2) is False  # alone: the other rank did not come in time
    assert d.every_rank_tracks(timeout=60) is False  # it comes late: it keeps to what was decided
    store.add("lrviz/track-1/count", 1)  # the other rank of the next run is there
    assert d.every_rank_tracks(timeout=60) is True
    assert d.every_rank_tracks(timeout=0) is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="here it would run the check itself")
def test_the_nccl_check_refuses_cleanly_where_there_is_no_cuda():
    """bench/ddp_nccl_check.py is for a machine with GPUs: without CUDA it says so and exits 2, before
    joining any job (its --device cpu dry run is in test_distributed_torchrun.py)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "ddp_nccl_check.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, str(script), "--steps", "10"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("no CUDA here: run this on a machine with GPUs (--device cpu: a dry run with "
                                   "gloo)")


def test_stopping_the_fault_watcher_waits_until_it_is_out_of_the_jobs_store():
    """close() destroys the process group and its store next: a watcher still inside a store call then
    aborts the process ('terminate called without an active exception', seen at a job's end)."""
    inside, release = threading.Event(), threading.Event()

    def fault():
        inside.set()
        release.wait(60)

    w = FaultWatcher(types.SimpleNamespace(rank=0, fault=fault), lambda f: None)
    w.start()
    assert inside.wait(60)
    threading.Timer(0.2, release.set).start()
    w.stop()
    assert release.is_set() and not w._thread.is_alive()
