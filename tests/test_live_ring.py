"""The shared-memory ring of step rows a local client reads (lrviz/live/ring.py).

A real engine trains in a thread and serves itself on a real Unix socket; a RemoteRun attaches as
the app does. Nothing waits on the clock: tests wait on the run's rows and on acks.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_live import WAIT, make_engine, wait_for

from lrviz.live import ring as ring_mod
from lrviz.live.connection import (
    ConnectionInfo,
    connection_path,
    find_live,
    read_connection,
    write_connection,
)
from lrviz.live.endpoint import LiveEndpoint
from lrviz.live.ring import RingReader, RingWriter
from lrviz.live.run import RemoteRun
from lrviz.live.serve import serving
from lrviz.live.source import RunSource
from lrviz.records import STEP_COLUMNS, StepBuffer
from lrviz.store.runs import RunStore

CAP = 1000  # a small ring (not a multiple of a chunk, nor of a block): a short run laps it


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "runs.sqlite")
    yield s
    s.close()


@pytest.fixture
def small_ring(monkeypatch):
    monkeypatch.setattr(ring_mod, "CAPACITY", CAP)


def same_rows(run: RemoteRun, eng) -> None:
    mine, theirs = run.buffer.view(), eng.buffer.view()
    assert len(mine["loss"]) == len(theirs["loss"])
    for col in (*STEP_COLUMNS, "step"):
        assert mine[col].dtype == theirs[col].dtype, col
        assert mine[col].tobytes() == theirs[col].tobytes(), col  # bitwise


class Recorder:
    """Wraps a RemoteRun's message handler: which rows came from the ring and which on the socket."""

    def __init__(self, run: RemoteRun, hold=None):
        self.run = run
        self.inner = run.client.on_message
        self.hold = hold
        self.ring_rows: list[tuple[int, int]] = []
        self.socket_rows: list[tuple[int, int]] = []
        self.kinds: list[str] = []
        run.client.on_message = self

    def __call__(self, h, body):
        self.kinds.append(h["t"])
        if h["t"] == "steps":
            span = (int(h["row"]), int(h["row"]) + int(h["n"]))
            (self.socket_rows if "cols" in h else self.ring_rows).append(span)
            if "cols" not in h and self.hold is not None:
                self.hold(span)
        self.inner(h, body)


def attach_recorded(ep, hold=None) -> tuple[RemoteRun, Recorder]:
    run = RemoteRun(ep.info)
    rec = Recorder(run, hold)
    return run.connect(), rec


def test_a_ring_client_gets_exactly_the_buffer_s_rows_over_more_than_the_ring_holds(store, small_ring):
    eng = make_engine(store, steps=3 * CAP + 123)
    with serving(eng, store) as ep:
        eng.start()
        run, rec = attach_recorded(ep)
        eng.join(WAIT)
        assert run.done.wait(WAIT) and run.lost is None
        same_rows(run, eng)
        assert run.step == eng.step and run.epoch == eng.epoch
        assert run.client.ring is not None and run.client.ring.capacity == CAP
        ring_total = sum(b - a for a, b in rec.ring_rows)
        assert ring_total > 2 * CAP  # most rows came from the ring, lapping it more than twice
        first_ring_row = rec.ring_rows[0][0]
        assert all(b <= first_ring_row for _, b in rec.socket_rows)  # the socket: only rows before the ring's
    run.close()


def test_a_client_that_sleeps_past_the_ring_gets_the_lapped_rows_over_the_socket(store, small_ring):
    eng = make_engine(store, steps=6 * CAP)
    held = threading.Event()

    def hold(span):
        if not held.is_set():  # the reader sleeps until the run wrote the ring over twice
            held.set()
            wait_for(lambda: len(eng.buffer) > span[1] + 2 * CAP or eng.done.is_set())

    with serving(eng, store) as ep:
        eng.start()
        run, rec = attach_recorded(ep, hold)
        eng.join(WAIT)
        assert run.done.wait(WAIT) and run.lost is None
        assert held.is_set() and len(eng.buffer) == 6 * CAP
        assert rec.kinds.count("rows_done") >= 1  # it asked for the rows it missed
        asked = [span for span in rec.socket_rows if span[0] >= rec.ring_rows[0][1]]
        assert sum(b - a for a, b in asked) >= CAP
        same_rows(run, eng)  # no row lost, none twice, none wrong
        spans = sorted(rec.ring_rows + rec.socket_rows)
        assert spans[0][0] == 0
        for (_, b), (a, _) in zip(spans, spans[1:]):
            assert a == b  # contiguous: every row handed on exactly once
    run.close()


def test_a_client_that_cannot_map_the_ring_gets_its_rows_on_the_socket(store, small_ring, monkeypatch):
    from lrviz.live import client as client_mod

    def refuse(path):
        raise OSError("no such /dev/shm here")

    monkeypatch.setattr(client_mod, "RingReader", refuse)
    eng = make_engine(store, steps=2 * CAP)
    with serving(eng, store) as ep:
        eng.start()
        run, rec = attach_recorded(ep)
        eng.join(WAIT)
        assert run.done.wait(WAIT) and run.lost is None
        assert rec.ring_rows == [] and "ring" in rec.kinds
        same_rows(run, eng)
    run.close()


def test_the_ring_file_is_private_named_in_the_connection_file_and_removed_at_the_end(store, small_ring):
    eng = make_engine(store, steps=100_000, start_paused=True)
    with serving(eng, store) as ep:
        eng.start()
        run = RemoteRun(ep.info).connect()
        run.resume().result(WAIT)
        wait_for(lambda: run.client.ring is not None, run)
        path = Path(ep.info.ring)
        assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(path.name) > 40  # the pid and 128 random bits
        assert read_connection(connection_path(store.path, eng.run_id)).ring == str(path)
        eng.stop()
        eng.join(WAIT)
        assert run.done.wait(WAIT)
    assert not path.exists()
    run.close()


def test_a_stale_ring_is_removed_with_its_connection_file(store):
    # a process that made a ring and died without closing it (as a kill -9 leaves it)
    dead = subprocess.run([sys.executable, "-c", "import os; from lrviz.live.ring import RingWriter, ring_path; "
                           "print(RingWriter(ring_path(None), 1, 0).path, os.getpid())"],
                          capture_output=True, text=True, check=True)
    ring, pid = dead.stdout.split()
    assert Path(ring).exists()
    path = connection_path(store.path, 7)
    write_connection(path, ConnectionInfo("unix", "/nonexistent.sock", "t" * 64, pid=int(pid), run_id=7, ring=ring))
    assert find_live(store.path, 7) is None
    assert not path.exists() and not Path(ring).exists()


def test_an_ack_goes_out_at_once_not_at_the_next_tick(store, monkeypatch):
    from lrviz.live import endpoint as ep_mod

    monkeypatch.setattr(ep_mod, "RING_TICK_S", 3600.0)  # a tick would never come within the test
    eng = make_engine(store, steps=100_000, start_paused=True)
    ep = LiveEndpoint(RunSource(eng), tick=3600.0)
    ep.start()
    eng.start()
    try:
        for ring in (True, False):
            run = RemoteRun(ep.info, ring=ring).connect()
            ack = run.set_lr(0.02).result(WAIT)  # woken by the ack itself
            assert ack["step"] == 0
            assert run.pause().result(WAIT)["kind"] == "pause"
            run.close()
    finally:
        eng.stop()
        eng.join(WAIT)
        ep.close()


def test_an_ack_waits_for_the_rows_before_its_step_unless_the_run_went_back_before_it():
    from lrviz.live.endpoint import _Client

    class Source:  # a run that published 200 rows; its step now is ``step``
        done = threading.Event()

        def __init__(self, step):
            self.buf = StepBuffer(groups=1)
            self.buf.write(0, epoch=np.zeros(200, np.int32), time=np.zeros(200), loss=np.zeros(200),
                           grad_norm=np.zeros(200, np.float32), lr=np.zeros(200))
            self.buf.publish(200)
            self.step = step

        def records(self):
            return self.buf, [], []

        def snapshot(self):
            return {"step": self.step}

    ack = {"t": "ack", "ok": True, "kind": "rollback", "step": 234}
    ahead = LiveEndpoint(Source(step=234))  # rows 200..233 are still to be published: held
    c, d = _Client(1, None, "test"), _Client(2, None, "test")
    try:
        assert not ahead._may_send(c, ack)
        assert ahead._may_send(c, {**ack, "step": 200})  # its rows are all there
        back = LiveEndpoint(Source(step=200))  # a roll-back restored step 200: rows 200..233 never come
        assert back._may_send(d, ack)
    finally:
        c.close_pipe()
        d.close_pipe()


def test_a_ring_reader_never_hands_on_overwritten_rows(tmp_path):
    buf = StepBuffer(groups=2)
    w = RingWriter(tmp_path / "lrviz-ring-test", groups=2, first_step=5, capacity=CAP)
    buf.mirror = w
    rng = np.random.default_rng(0)

    def block(k):
        n = len(buf)
        buf.write(n, epoch=np.full(k, 1, np.int32), time=rng.random(k), loss=rng.random(k),
                  grad_norm=rng.random(k).astype(np.float32), lr=rng.random((k, 2)))
        buf.publish(n + k)

    r = RingReader(w.path)
    assert r.start is None and r.read(0) == ({}, 0)
    block(100)
    cols, hi = r.read(0)
    assert hi == 100 and r.first_step == 5 and r.capacity == CAP
    for name in STEP_COLUMNS:
        assert cols[name].tobytes() == buf.view(0, 100)[name].tobytes()
    for _ in range(CAP // 64 + 2):
        block(64)
    assert r.read(0)[0] is None  # lapped: row 0 was overwritten
    lo = len(buf) - CAP
    cols, hi = r.read(lo)  # the whole window, across the wrap
    assert hi == len(buf)
    for name in STEP_COLUMNS:
        assert cols[name].tobytes() == buf.view(lo, hi)[name].tobytes()
    assert r.read(lo - 1)[0] is None
    r.close()
    w.close()
    assert not w.path.exists()
    assert os.listdir(tmp_path) == []
