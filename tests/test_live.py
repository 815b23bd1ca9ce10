"""The live endpoint in one process: commands acked at the exact step, streams, clients, tokens.

A real engine trains in a thread and serves itself on a real socket; clients attach through the
same code the app and ``lrviz steer`` use. Nothing waits on the clock: tests wait on acks and on
the run's own events.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine
from lrviz.experiment import load_experiment
from lrviz.live import protocol
from lrviz.live.client import LiveClient, NotLive
from lrviz.live.connection import (
    ConnectionInfo,
    connection_path,
    find_live,
    live_runs,
    read_connection,
    write_connection,
)
from lrviz.live.endpoint import LiveEndpoint
from lrviz.live.run import CommandRejected, LocalRun, RemoteRun
from lrviz.live.serve import serving
from lrviz.live.source import EngineSource
from lrviz.records import STEP_COLUMNS, StepBuffer
from lrviz.states import Command, RunState
from lrviz.store.runs import RunStore

SCRIPTS = Path(__file__).parent / "scripts"
WAIT = 60  # seconds: only a ceiling for a broken test, never a measure


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "runs.sqlite")
    yield s
    s.close()


def make_engine(store, steps=400, **kw):
    exp = load_experiment(SCRIPTS / "tiny.py")
    cfg = RunConfig(**exp.defaults).merged({"steps": steps, "checkpoint_every": kw.pop("checkpoint_every", None)})
    return TrainingEngine(exp, cfg, store, **kw)


@pytest.fixture
def served(store):
    """A paused engine served on a Unix socket, and its endpoint; stopped afterwards."""
    eng = make_engine(store, steps=100_000, start_paused=True)
    ctx = serving(eng, store)
    ep = ctx.__enter__()
    eng.start()
    yield eng, ep
    eng.stop()
    eng.join(WAIT)
    ctx.__exit__(None, None, None)


def attach(ep, **kw) -> RemoteRun:
    return RemoteRun(ep.info, **kw).connect()


def wait_for(pred, run=None, timeout=WAIT):
    """Wait until ``pred()`` holds, woken by the run's messages (or polling the engine)."""
    deadline = time.monotonic() + timeout
    while not pred():
        left = deadline - time.monotonic()
        assert left > 0, "timed out waiting"
        if run is not None:
            run.changed.wait(min(left, 0.5))
            run.changed.clear()
        else:
            time.sleep(0.005)


def test_set_lr_lands_exactly_at_the_acked_step(served):
    eng, ep = served
    run = attach(ep)
    first = run.set_lr(0.02).result(WAIT)
    assert first["step"] == 0 and first["data"] == {"lr": 0.02}
    run.resume().result(WAIT)
    # let it train, then change the rate while it runs
    wait_for(lambda: eng.step >= 50)
    ack = run.set_lr(0.003).result(WAIT)
    s = ack["step"]
    assert s >= 50
    run.pause().result(WAIT)
    lr = eng.buffer.view()["lr"][:, 0]
    assert np.all(lr[:s] == 0.02) and lr[s] == 0.003
    # the event is recorded at the acked step, and the client's copy equals the engine's
    ev = [e for e in eng.events if e.kind == "set_lr" and e.data["lr"] == 0.003]
    assert [e.step for e in ev] == [s]
    wait_for(lambda: len(run.buffer or ()) >= len(eng.buffer), run)
    mine, theirs = run.buffer.view(), eng.buffer.view()
    for col in ("loss", "lr", "grad_norm", "time", "epoch", "step"):
        assert np.array_equal(mine[col], theirs[col]), col
    run.close()


def test_every_command_is_acked_with_its_step_or_refused_with_a_reason(served, store):
    eng, ep = served
    run = attach(ep)
    assert run.pause().result(WAIT)["step"] == 0
    with pytest.raises(CommandRejected, match="learning rate"):
        run.set_lr("fast").result(WAIT)
    with pytest.raises(CommandRejected, match="momentum"):
        run.set_hyperparams(momentum=1.5).result(WAIT)
    with pytest.raises(CommandRejected, match="unknown"):
        run.command("explode").result(WAIT)
    assert run.step_once().result(WAIT)["step"] == 0
    wait_for(lambda: eng.step >= 1 and eng.state == "paused")
    sched = run.set_schedule("StepLR:step_size=10,gamma=0.5").result(WAIT)
    assert sched["step"] == 1 and sched["data"]["spec"] == "StepLR:step_size=10,gamma=0.5"
    ck = run.checkpoint().result(WAIT)
    assert ck["step"] == 1 and Path(ck["data"]["path"]).exists()
    hp = run.set_hyperparams(weight_decay=0.01).result(WAIT)
    assert hp["data"] == {"weight_decay": 0.01}
    rb = run.rollback(lr_factor=0.5).result(WAIT)
    assert rb["data"]["to_step"] <= 1 and rb["step"] == 1
    stop = run.stop().result(WAIT)
    assert stop["step"] == 1
    run.done.wait(WAIT)
    assert run.state == RunState.STOPPED
    assert store.get_run(eng.run_id).status == "stopped"
    # commands after the end are refused, with the state
    with pytest.raises((CommandRejected, NotLive)):
        run.set_lr(0.1).result(WAIT)


def test_two_clients_see_every_ack_and_the_same_history(served):
    eng, ep = served
    a = attach(ep, name="a")
    b = attach(ep, name="b")
    ack = a.set_lr(0.01).result(WAIT)
    b.set_lr(0.002).result(WAIT)
    a.resume().result(WAIT)
    wait_for(lambda: eng.step >= 30)
    a.pause().result(WAIT)
    for r in (a, b):
        wait_for(lambda r=r: len([x for x in r.acks if x.get("kind") in ("set_lr", "resume", "pause")]) >= 4, r)
    assert [(x["client_name"], x["kind"]) for x in a.acks] == [(x["client_name"], x["kind"]) for x in b.acks]
    assert {x["client_name"] for x in a.acks} == {"a", "b"}
    assert ack["step"] == 0
    a.close()
    b.close()


def test_a_late_client_gets_the_whole_history_then_live(served):
    eng, ep = served
    first = attach(ep)
    first.resume().result(WAIT)
    wait_for(lambda: eng.step >= 80)
    first.pause().result(WAIT)
    late = attach(ep, name="late")
    n = len(eng.buffer)
    wait_for(lambda: len(late.buffer or ()) >= n, late)
    assert np.array_equal(late.buffer.view()["loss"][:n], eng.buffer.view()["loss"][:n])
    assert [e.kind for e in late.events] == [e.kind for e in eng.events[: len(late.events)]]
    # resumable from any row: a client asking from row 40 gets rows 40.. only
    client_rows = []
    c = LiveClient(ep.info, since_row=40, on_message=lambda h, body: client_rows.append(h.get("row"))
                   if h["t"] == "steps" else None).connect()
    wait_for(lambda: bool(client_rows))
    assert client_rows[0] == 40
    c.close()
    first.close()
    late.close()


def test_a_wrong_token_is_refused_and_logged_and_the_run_carries_on(served, caplog):
    eng, ep = served
    bad = ConnectionInfo(ep.info.transport, ep.info.address, "0" * 64, port=ep.info.port)
    with caplog.at_level(logging.WARNING, logger="lrviz.live.endpoint"):
        with pytest.raises(NotLive, match="refused"):
            RemoteRun(bad).connect()
        assert any("wrong token" in r.getMessage() for r in caplog.records)
    assert ep.refused and "wrong token" in ep.refused[-1]
    good = attach(ep)
    assert good.resume().result(WAIT)["kind"] == "resume"
    wait_for(lambda: eng.step >= 5)
    assert eng.state == "running"
    good.close()


def test_garbage_before_the_handshake_never_reaches_the_run(served):
    eng, ep = served
    s = ep.info.connect()
    s.recv(len(protocol.MAGIC) + protocol.NONCE_BYTES)
    s.sendall(b"\x00\x00\x00\x05\x00\x00\x00\x00" + os.urandom(100))  # a frame, not an answer
    assert s.recv(1) == b"\x00"  # refused
    s.close()
    assert not eng.events or all(e.kind != "set_lr" for e in eng.events)
    assert attach(ep).pause().result(WAIT)["kind"] == "pause"


def test_frames_refuse_object_arrays_and_oversized_headers():
    with pytest.raises(protocol.ProtocolError):
        protocol.unpack_columns([["x", "|O", [1]]], b"\x00" * 8)
    with pytest.raises(protocol.ProtocolError):
        protocol.unpack_columns([["x", "<f8", [4]]], b"\x00" * 8)
    a, b = socket.socketpair()
    a.sendall(protocol._FRAME.pack(protocol.MAX_HEADER + 1, 0))
    with pytest.raises(protocol.ProtocolError, match="too large"):
        protocol.recv_frame(b)
    a.close()
    b.close()


def test_connection_file_is_private_registered_and_removed_at_the_end(store):
    eng = make_engine(store, steps=30)
    with serving(eng, store) as ep:
        eng.start()
        eng.join(WAIT)
        path = connection_path(store.path, eng.run_id)
        assert path.exists()
        assert (path.stat().st_mode & 0o777) == 0o600
        info = read_connection(path)
        assert info.run_id == eng.run_id and info.token == ep.token
        assert find_live(store.path, eng.run_id) is not None
        assert eng.run_id in live_runs(store.path)
        row = store.get_run(eng.run_id).endpoint  # the row says where it is served, never the token
        assert row["address"] == info.address and row["pid"] == os.getpid() and "token" not in row
    assert not path.exists()
    assert store.get_run(eng.run_id).endpoint is None
    assert find_live(store.path, eng.run_id) is None


def test_a_stale_connection_file_is_ignored_and_removed(store, tmp_path):
    # a process that has exited: its pid is free (or reused by nobody we could see as alive)
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path = connection_path(store.path, 7)
    write_connection(path, ConnectionInfo("unix", str(tmp_path / "gone.sock"), "t", pid=proc.pid))
    assert find_live(store.path, 7) is None
    assert not path.exists()
    assert live_runs(store.path) == {}


def test_lab_data_streams_range_test_progress_and_result(served):
    eng, ep = served
    run = attach(ep)
    ack = run.range_test(steps=25, start=1e-5, end=1.0).result(WAIT)
    assert ack["step"] == 0
    result = ack["data"]["result"]
    wait_for(lambda: run.range_test_result is not None and len(run.range_test_progress) >= len(result["lrs"]), run)
    assert [p[0] for p in run.range_test_progress] == pytest.approx(result["lrs"])
    run.close()


def test_local_and_remote_runs_offer_the_same_interface(served):
    eng, ep = served
    local = LocalRun(eng)
    remote = attach(ep)
    for r in (local, remote):
        assert r.pause().result(WAIT)["kind"] == Command.PAUSE
        with pytest.raises(CommandRejected):
            r.set_lr(-1).result(WAIT)
        assert r.state == RunState.PAUSED or r.state == "preparing"
    assert local.set_lr(0.07).result(WAIT)["step"] == remote.set_lr(0.07).result(WAIT)["step"]
    remote.close()


def test_a_local_run_reads_the_engine_s_records_and_state(store):
    eng = make_engine(store, steps=30)
    local = LocalRun(eng)
    eng.start()
    assert eng.join(WAIT)
    assert local.buffer is eng.buffer and len(local.buffer) == 30
    assert local.events is eng.events and local.validation is eng.validation
    assert (local.step, local.run_id, local.total_steps, local.lrs) == (30, eng.run_id, 30, eng.lrs)
    assert local.run_id is not None and local.state == RunState.FINISHED
    assert local.summary()["steps"] == 30


def test_endpoint_on_tcp_with_listen(store):
    eng = make_engine(store, steps=100_000, start_paused=True)
    ep = LiveEndpoint(EngineSource(eng), listen="127.0.0.1:0")
    info = ep.start()
    eng.start()
    try:
        assert info.transport == "tcp" and info.port
        run = RemoteRun(ConnectionInfo("tcp", "127.0.0.1", info.token, port=info.port)).connect()
        assert run.set_lr(0.01).result(WAIT)["step"] == 0
        run.stop().result(WAIT)
        run.done.wait(WAIT)
        assert run.state == "stopped"
    finally:
        eng.stop()
        eng.join(WAIT)
        ep.close()


def test_a_client_that_vanishes_does_not_disturb_the_run(served):
    eng, ep = served
    c = attach(ep)
    c.resume().result(WAIT)
    c.client._sock.close()  # no bye: the socket just goes
    other = attach(ep)
    start = eng.step
    wait_for(lambda: eng.step >= start + 20)
    assert other.pause().result(WAIT)["step"] >= start + 20
    other.close()


def test_connection_info_rejects_a_damaged_file(tmp_path):
    p = tmp_path / "run-1.json"
    p.write_text("{not json")
    from lrviz.errors import ConfigError

    with pytest.raises(ConfigError, match="connection file"):
        read_connection(p)
    p.write_text('{"transport": "unix"}')
    with pytest.raises(ConfigError, match="connection file"):
        read_connection(p)


def test_endpoint_adds_no_thread_that_outlives_the_run(store):
    eng = make_engine(store, steps=20)
    with serving(eng, store) as ep:
        eng.start()
        r = attach(ep)
        eng.join(WAIT)
        r.done.wait(WAIT)
        r.close()
    deadline = threading.Event()
    for _ in range(100):
        names = [t.name for t in threading.enumerate() if t.name.startswith("lrviz-live")]
        if not names:
            break
        deadline.wait(0.05)
    assert not names, names


def test_a_confirmation_over_the_channel_names_the_winner_and_restores_the_weights(served):
    from lrviz.lab.rangecurve import Confirmation, RangeTestResult

    eng, ep = served
    run = attach(ep)
    ack = run.range_test(steps=60, start=1e-4, end=3.0, confirm=False).result(WAIT)
    result = RangeTestResult.from_dict(ack["data"]["result"])
    assert result.suggestions.best is not None, result.suggestions.reason
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    rates = [(result.suggestions.minimum_tenth, "minimum_tenth"), (result.suggestions.minimum_tenth / 100, "below")]
    ack = run.confirm_lr(rates, steps=8).result(WAIT)
    assert ack["kind"] == Command.CONFIRM_LR and ack["step"] == 0
    c = Confirmation.from_dict(ack["data"]["confirmation"])
    assert [(t.lr, t.source) for t in c.trials] == [(float(a), b) for a, b in rates]
    assert c.steps == 8 and all(len(t.losses) <= 8 for t in c.trials) and c.reason
    assert c.winner is None or c.winner.lr in {lr for lr, _ in rates}
    assert all(np.array_equal(v.numpy(), before[k].numpy()) for k, v in eng.model.state_dict().items())
    with pytest.raises(CommandRejected, match="no learning rates"):
        run.confirm_lr([], steps=8).result(WAIT)
    run.close()


def test_a_range_test_result_travels_as_plain_values_and_back(served):
    from lrviz.lab.rangecurve import RangeTestResult

    eng, ep = served
    run = attach(ep)
    ack = run.range_test(steps=40, start=1e-4, end=10.0, confirm=True, confirm_steps=4).result(WAIT)
    got = RangeTestResult.from_dict(ack["data"]["result"])
    direct = LocalRun(eng).range_test(steps=40, start=1e-4, end=10.0, confirm=True, confirm_steps=4).result(WAIT)
    same = RangeTestResult.from_dict(direct["data"]["result"])  # the same weights: the same test
    np.testing.assert_array_equal(got.lrs, same.lrs)
    np.testing.assert_array_equal(got.losses, same.losses)  # non-finite losses included ("inf" as JSON)
    assert got.suggestions == same.suggestions and got.stop_reason == same.stop_reason
    assert (got.confirmation is None) == (same.confirmation is None)
    if got.confirmation is not None:
        assert got.confirmation.reason == same.confirmation.reason
        assert [t.lr for t in got.confirmation.trials] == [t.lr for t in same.confirmation.trials]
    run.close()


def test_a_local_run_shows_the_engines_numbers_as_they_change(store):
    # Before: Run's class defaults (step = 0, buffer = None, run_id = None) hid the engine's values.
    eng = make_engine(store, steps=120)
    run = LocalRun(eng)
    eng.start()
    assert eng.done.wait(WAIT)
    assert run.step == eng.step == 120 and run.total_steps == eng.total_steps == 120
    assert run.run_id == eng.run_id is not None and run.buffer is eng.buffer and len(run.buffer) == 120
    assert run.epoch == eng.epoch and run.error_detail == eng.error_detail
    assert run.summary()["steps"] == 120 and run.is_terminal


def test_a_ticks_frames_go_out_in_one_write_and_a_long_history_is_flushed_early():
    """What one tick sends is one write (each write wakes the reader); past ``limit`` bytes the batch
    goes out before the tick ends, so a long history never sits whole in memory."""
    a, b = socket.socketpair()
    writes = []

    class Counting:
        def sendall(self, data):
            writes.append(len(data))
            a.sendall(data)

    batch = protocol.FrameBatch(Counting(), limit=1000)
    batch.add({"t": "events", "items": [1]})
    batch.add({"t": "steps", "n": 2}, b"\x01" * 16)
    batch.add({"t": "state", "step": 2})
    assert writes == []
    batch.flush()
    assert len(writes) == 1
    got = [protocol.recv_frame(b) for _ in range(3)]
    assert [h["t"] for h, _ in got] == ["events", "steps", "state"] and got[1][1] == b"\x01" * 16
    batch.add({"t": "steps", "n": 100}, b"\x02" * 1500)  # past the limit: written at once
    assert len(writes) == 2
    assert protocol.recv_frame(b)[1] == b"\x02" * 1500
    batch.flush()
    assert len(writes) == 2  # nothing left to write
    a.close()
    b.close()


class _Source:
    """A run as the endpoint sees it: rows, a state that moves with each step, and a setting."""

    def __init__(self):
        self.buffer = StepBuffer(groups=1, capacity=64)
        self.done = threading.Event()
        self.pause_requested = False

    def add_row(self):
        n = len(self.buffer)
        self.buffer.append(0, float(n), 1.0 / (n + 1), 0.5, [0.1 / (n + 1)])

    def snapshot(self):
        n = len(self.buffer)
        return {"state": "running", "step": n, "epoch": 0, "lrs": [0.1 / n if n else 0.1],
                "pause_requested": self.pause_requested}

    def records(self):
        return self.buffer, [], []

    def lab_updates(self, cursor):
        return []


def test_the_step_rides_on_the_rows_and_a_state_message_goes_out_only_when_something_else_changed(monkeypatch):
    from lrviz.live import endpoint as ep_mod

    monkeypatch.setattr(ep_mod, "HEARTBEAT_S", 1e9)  # no heartbeat in this test
    src = _Source()
    ep = LiveEndpoint(src)
    a, b = socket.socketpair()
    c = ep_mod._Client(1, a, "test")
    c.subscribed = True
    out = protocol.FrameBatch(a)

    def tick():
        ep._push(c, out)
        out.flush()
        a.sendall(protocol.encode_frame({"t": "mark"})[0])  # the end of this tick's frames
        frames = []
        while True:
            h, _ = protocol.recv_frame(b)
            if h["t"] == "mark":
                return frames
            frames.append(h)

    src.add_row()
    first = tick()
    assert [f["t"] for f in first] == ["steps", "state"]  # a new client gets the state once
    for _ in range(3):  # the step, the epoch and the rate change with every row: no state message
        src.add_row()
        src.add_row()
        frames = tick()
        assert [f["t"] for f in frames] == ["steps"]
        assert frames[0]["step"] == len(src.buffer) and frames[0]["lrs"] == [0.1 / len(src.buffer)]
    assert tick() == []  # nothing new, nothing sent
    src.pause_requested = True  # anything else: a state message, with the moving parts in it
    frames = tick()
    assert [f["t"] for f in frames] == ["state"]
    assert frames[0]["pause_requested"] is True and frames[0]["step"] == len(src.buffer)
    assert tick() == []
    c.state_at -= ep_mod.HEARTBEAT_S + 1e9  # a heartbeat is due: the state goes out unchanged
    assert [f["t"] for f in tick()] == ["state"]
    a.close()
    b.close()


def test_a_client_takes_the_step_and_rates_from_the_rows_once_they_are_in_its_buffer(tmp_path):
    src = _Source()
    for _ in range(5):
        src.add_row()
    view = src.buffer.view()
    desc, payload = protocol.pack_columns({name: view[name] for name in STEP_COLUMNS})
    run = RemoteRun(ConnectionInfo("unix", str(tmp_path / "none.sock"), "token"))
    seen = []
    real = run._apply_state

    def apply(s):
        if "step" in s:  # the rows must be in the buffer before the step that names them
            seen.append((s["step"], len(run.buffer) if run.buffer is not None else 0))
        real(s)

    run._apply_state = apply
    run._on_message({"t": "steps", "row": 0, "first_step": 0, "n": 5, "cols": desc, "step": 5, "epoch": 0,
                     "lrs": [0.02]}, protocol.unpack_columns(desc, payload))
    assert seen == [(5, 5)] and run.step == 5 and run.lrs == [0.02]
    assert np.array_equal(run.buffer.view()["loss"], view["loss"])
