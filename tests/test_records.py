"""The step buffer: chunks, sealing (compression in memory), views that equal what was written."""

from __future__ import annotations

import threading

import numpy as np

from lrviz.records import CHUNK_ROWS, StepBuffer


def fill(buf: StepBuffer, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cols = {
        "epoch": (np.arange(n) // 1000).astype(np.int32),
        "time": np.cumsum(rng.random(n) * 1e-3),
        "loss": rng.lognormal(size=n),
        "grad_norm": rng.random(n).astype(np.float32),
        "lr": np.repeat(rng.random((n // 500 + 1, buf.groups)), 500, axis=0)[:n],
    }
    for a in range(0, n, 777):  # blocks that straddle chunk boundaries
        b = min(n, a + 777)
        buf.extend({k: v[a:b] for k, v in cols.items()})
    return cols


def test_views_equal_what_was_written_sealed_or_not():
    buf = StepBuffer(groups=2, first_step=100)
    n = 5 * CHUNK_ROWS + 123
    cols = fill(buf, n)
    for sealed in (False, True):
        if sealed:
            assert buf.seal() == 4  # the newest full chunk stays raw
        for a, b in ((0, n), (10, 20), (CHUNK_ROWS - 5, CHUNK_ROWS + 5), (3 * CHUNK_ROWS, n), (n - 1, n)):
            v = buf.view(a, b)
            for name, want in cols.items():
                assert np.array_equal(v[name], want[a:b]), (name, a, b, sealed)
            assert list(v["step"][:2]) == [100 + a, 100 + a + 1][: b - a]


def test_sealed_history_takes_much_less_memory():
    buf = StepBuffer(groups=1)
    fill(buf, 20 * CHUNK_ROWS)
    raw = buf.nbytes
    buf.seal()
    assert buf.nbytes < raw * 0.6  # random losses and times: real ones compress better
    assert buf.nbytes / len(buf) < 24


def test_a_view_within_a_raw_chunk_is_not_a_copy():
    buf = StepBuffer()
    fill(buf, 100)
    a, b = buf.view(10, 20), buf.view(10, 20)
    assert np.shares_memory(a["loss"], b["loss"])


def test_readers_and_a_sealer_while_the_writer_appends():
    buf = StepBuffer()
    n = 12 * CHUNK_ROWS
    errors = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            k = len(buf)
            if k > 10:
                v = buf.view(k - 10, k)
                if not np.array_equal(v["loss"], np.arange(k - 10, k, dtype=np.float64)):
                    errors.append((k, v["loss"][:3]))
            if k > CHUNK_ROWS:
                v = buf.view(0, CHUNK_ROWS + 1)
                if v["loss"][-1] != CHUNK_ROWS:
                    errors.append(("head", k))

    def sealer():
        while not stop.is_set():
            buf.seal()

    threads = [threading.Thread(target=reader), threading.Thread(target=sealer)]
    for t in threads:
        t.start()
    for i in range(n):
        buf.append(0, float(i), float(i), 1.0, [0.1])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert np.array_equal(buf.view()["loss"], np.arange(n, dtype=np.float64))


def test_the_store_writer_keeps_what_it_stored_compressed(tmp_path):
    """What bounds the training process's history in memory (issue 9: <= 24 bytes a retained step):
    each flush of its store writer seals the stored chunks, all but the two newest (the one being
    written and the last full one), and the sealed history reads back as written."""
    from types import SimpleNamespace

    from lrviz.store.runs import RunStore
    from lrviz.store.writer import StoreWriter

    buf = StepBuffer()
    cols = fill(buf, 24 * CHUNK_ROWS + 100)
    raw_chunk = buf.nbytes // len(buf._chunks)
    run = SimpleNamespace(buffer=buf, events=[], validation=[], state="running")
    with RunStore(tmp_path / "runs.sqlite") as store:
        run_id = store.create_run(script_path="/x/s.py", script_hash="h", config={}, device="cpu")
        StoreWriter(store, run_id, run).flush()
        assert buf.nbytes - 2 * raw_chunk < 24 * len(buf)  # the sealed history, without the two raw chunks
        stored = store.load_steps(run_id)
    view = buf.view()
    for name, want in cols.items():
        assert np.array_equal(view[name], want) and np.array_equal(stored[name], want), name
