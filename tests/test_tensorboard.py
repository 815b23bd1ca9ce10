"""TensorBoard both ways (lrviz.tensorboard): ``lrviz export RUN --format tb`` read back with TensorBoard's
own reader equals the CSV export; ``lrviz import DIR`` of logs written with TensorBoard's own writer makes
read-only runs that list, export and hold what was logged; bad logs get one message each."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from store_events import wait_until
from test_broken_inputs import assert_one_clean_message, run_main

from lrviz.decimate import ema_debiased
from lrviz.export import DEFAULT_SMOOTHING
from lrviz.records import Event, ValPoint
from lrviz.store.runs import RunStore

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'lrviz[tensorboard]')")

from tensorboard.backend.event_processing import plugin_event_accumulator  # noqa: E402
from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402
from tensorboard.plugins.scalar import summary_v2 as scalar_summary  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def read_tb(folder: Path) -> dict[str, list[tuple[int, float, object]]]:
    """tag -> [(step, wall_time, value)] as TensorBoard's own event accumulator loads them (every point)."""
    acc = plugin_event_accumulator.EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        out[tag] = [(e.step, e.wall_time, tensor_util.make_ndarray(e.tensor_proto).item())
                    for e in acc.Tensors(tag)]
    return out


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def f32(x: str | float) -> float:
    """A value as TensorBoard stores a scalar: rounded to float32."""
    return float(np.float32(x))


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.fixture
def store(tmp_path: Path):
    with RunStore(tmp_path / "store") as s:
        yield s


def rich_run(store: RunStore) -> int:
    """A run with everything an export carries: two LR groups, non-finite losses, validation (with and
    without accuracy, twice at one step), events (two at one step), extra scalars (sparse, off the step rows)."""
    run = store.create_run(script_path="/x/mnist.py", script_hash="h", config={"lr": 0.1}, device="cpu", name="rich")
    store.set_status(run, "running")
    n = 300
    rng = np.random.default_rng(3)
    loss = 2.0 / (1 + np.arange(n) / 50) + rng.uniform(0, 0.1, n)
    loss[[17, 18]] = [np.nan, np.inf]
    lr = np.stack([np.full(n, 0.1), np.full(n, 0.01)], axis=1)
    lr[150:] /= 3
    cols = {"epoch": (np.arange(n) // 100).astype(np.int32), "time": np.arange(n) * 0.013 + rng.uniform(0, 1e-3, n),
            "loss": loss, "grad_norm": rng.uniform(0, 3, n).astype(np.float32), "lr": lr}
    for i in range(0, n, 128):
        store.append_steps(run, i, {k: v[i:i + 128] for k, v in cols.items()})
    store.add_validation(run, [ValPoint(99, 0, 0.9, 0.5, 1.3), ValPoint(199, 1, 0.7, None, 2.6),
                               ValPoint(199, 1, 0.69, 0.6, 2.7), ValPoint(299, 2, math.nan, 0.7, 3.9)])
    store.add_events(run, [Event(150, "set_lr", {"lr": 0.0333}, 1.95), Event(150, "pause", {}, 1.96),
                           Event(220, "checkpoint", {"path": "/x/c.pt"}, 2.9)])
    store.add_scalars(run, "val/top5", [99, 199, 299], [0.7, 0.8, 0.9], [1.3, 2.6, 3.9])
    store.add_scalars(run, "weird, name", [50, 350], [1.5, -2.5], [0.65, 4.5])  # 350: past the last step
    store.set_status(run, "finished")
    return run


def test_tb_export_read_back_with_tensorboard_equals_the_csv_export(store: RunStore, tmp_path: Path, capsys):
    run = rich_run(store)
    out = tmp_path / "exp"
    result = run_main(["export", str(run), "--format", "csv,json,tb", "--out", str(out), "--store", str(store.path)],
                      capsys)
    assert result.status == 0, result.stderr
    tb = read_tb(out)
    header, rows = read_csv(out / "metrics.csv")
    started = json.loads((out / "run.json").read_text())["run"]["started_at"]

    # every CSV column but step and time is a tag of the same name; every value is there, at its step, as
    # TensorBoard keeps scalars: rounded to float32
    assert set(tb) == set(header) - {"step", "time"} | {"loss_smoothed", "events"}
    train = [r for r in rows if r[header.index("loss")] != ""]
    for j, name in enumerate(header):
        if name in ("step", "time"):
            continue
        want = [(int(r[0]), f32(r[j])) for r in rows if r[j] != ""]
        got = [(s, v) for s, _, v in tb[name]]
        assert len(got) == len(want) and all(g[0] == w[0] and same(g[1], w[1]) for g, w in zip(got, want)), name
    # wall times: the run's start plus the CSV's time column
    t = header.index("time")
    assert [w for _, w, _ in tb["loss"]] == [started + float(r[t]) for r in train]
    # the smoothed loss is the app's smoothing of the CSV's loss
    smooth = ema_debiased(np.array([float(r[header.index("loss")]) for r in train]), DEFAULT_SMOOTHING)
    assert all(same(v, f32(s)) for (_, _, v), s in zip(tb["loss_smoothed"], smooth, strict=True))
    # events as text at their steps, two at one step in one text
    texts = {s: v.decode() for s, _, v in tb["events"]}
    assert sorted(texts) == [150, 220]
    assert "**set_lr** lr=0.0333" in texts[150] and "**pause**" in texts[150] and "/x/c.pt" in texts[220]

    # an export again replaces lrviz's file, and leaves other event files alone
    other = out / "events.out.tfevents.1.host.1.0"
    other.write_bytes(b"")
    run_main(["export", str(run), "--format", "tb", "--out", str(out), "--store", str(store.path)], capsys)
    assert len(list(out.glob("events.out.tfevents.*.lrviz"))) == 1 and other.exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_tensorboard_app_shows_the_export(store: RunStore, tmp_path: Path, capsys):
    """The real TensorBoard server (its fast data server when installed, as users run it), on loopback:
    its scalars and text dashboards serve the exported values."""
    run = rich_run(store)
    logdir = tmp_path / "logs"
    run_main(["export", str(run), "--format", "csv,tb", "--out", str(logdir / "rich"), "--store", str(store.path)],
             capsys)
    header, rows = read_csv(logdir / "rich" / "metrics.csv")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def get(path: str) -> object:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return None

    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        tags = wait_until("TensorBoard's scalar tags", lambda: (get("/data/plugin/scalars/tags") or {}).get("rich"),
                          alive)
        assert {"loss", "lr", "lr_1", "val_loss", "val/top5", "weird, name", "loss_smoothed"} <= set(tags)
        for name in ("loss", "val_loss", "weird, name"):
            j = header.index(name)
            last = {int(r[0]): f32(r[j]) for r in rows if r[j] != ""}  # the server keeps one point a step
            want = [(s, v if math.isfinite(v) else {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[str(v)])
                    for s, v in last.items()]
            quoted = urllib.parse.quote(name)
            got = wait_until(f"the {name} series", lambda q=quoted: get(f"/data/plugin/scalars/scalars?run=rich&tag={q}"),
                             alive)
            assert [(s, v) for _, s, v in got] == want, name
        texts = get("/data/plugin/text/text?run=rich&tag=events")
        assert [t["step"] for t in texts] == [150, 220] and "set_lr" in texts[0]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def write_logs(folder: Path, tags: dict[str, list[tuple[int, float]]], *, tensors: bool = False,
               t0: float = 1.7e9) -> None:
    """An event file written with TensorBoard's own writer: simple_value scalars (as torch's SummaryWriter,
    Keras 1 and Lightning write them), or float32 tensor scalars (TF2's tf.summary.scalar)."""
    writer = EventFileWriter(str(folder))
    points = sorted((s, tag, v) for tag, pts in tags.items() for s, v in pts)
    for s, tag, v in points:
        if tensors:
            summary = scalar_summary.scalar_pb(tag, v)
        else:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=v)])
        writer.add_event(event_pb2.Event(step=s, wall_time=t0 + s / 10, summary=summary))
    writer.close()


def test_an_imported_run_lists_exports_and_holds_what_was_logged(tmp_path: Path, capsys):
    logs = tmp_path / "logs"
    loss = [(s, 2.0 / (1 + s / 300)) for s in range(0, 2000, 10)]  # every 10th step
    write_logs(logs / "sgd", {"train/loss": loss, "lr-SGD/pg1": [(s, 0.1) for s, _ in loss],
                              "lr-SGD/pg2": [(s, 0.01) for s, _ in loss],
                              "train/loss_epoch": [(s, 1.0) for s in (999, 1999)],
                              "val/loss": [(s, 1.5) for s in (999, 1999)]})
    write_logs(logs / "adam", {"loss": loss, "learning_rate": [(s, 1e-3) for s, _ in loss]}, tensors=True)
    db = tmp_path / "runs.sqlite"

    out = run_main(["import", str(logs), "--store", str(db)], capsys)
    assert out.status == 0, out.stderr
    assert "loss  <- 'train/loss' (also like a loss: train/loss_epoch" in out.stdout, out.stdout
    assert "lr    <- 'lr-SGD/pg1', 'lr-SGD/pg2'" in out.stdout and "lr    <- 'learning_rate'" in out.stdout
    listed = run_main(["runs", "--store", str(db)], capsys)
    lines = {ln.split()[1]: ln for ln in listed.stdout.splitlines()[1:]}
    assert set(lines) == {"logs/sgd", "logs/adam"} and all(ln.endswith("imported") for ln in lines.values())

    with RunStore(db) as store:
        for info in store.list_runs():
            assert info.kind == "imported" and info.status == "finished"
            assert info.started_at == 1.7e9 and info.steps == len(loss)
            steps = store.load_steps(info.id)
            assert steps["step"].tolist() == [s for s, _ in loss]
            # what was written, as TensorBoard stores it (float32), read back exactly
            assert steps["loss"].tolist() == [float(np.float32(v)) for _, v in loss]
            assert steps["time"].tolist() == [s / 10 for s, _ in loss]
        sgd = store.get_run("logs/sgd")
        assert store.load_steps(sgd.id)["lr"][0].tolist() == [float(np.float32(0.1)), float(np.float32(0.01))]
        assert store.scalar_names(sgd.id) == ["train/loss_epoch", "val/loss"]
        assert store.load_scalars(sgd.id)["val/loss"][0].tolist() == [999, 1999]

    exp = tmp_path / "exp"
    out = run_main(["export", "logs/sgd", "--format", "csv,json", "--out", str(exp), "--store", str(db)], capsys)
    assert out.status == 0, out.stderr
    header, rows = read_csv(exp / "metrics.csv")
    li = header.index("loss")
    assert [float(r[li]) for r in rows if r[li]] == [float(np.float32(v)) for _, v in loss]
    # logged off the loss's steps: rows of their own, with the step and the series only
    assert [(r[0], r[li], r[header.index("val/loss")]) for r in rows if not r[li]] == [("999", "", "1.5"),
                                                                                       ("1999", "", "1.5")]
    assert json.loads((exp / "run.json").read_text())["run"]["kind"] == "imported"

    for argv in (["resume", "logs/sgd"], ["replay", "logs/sgd"],
                 ["run", str(REPO / "tests" / "scripts" / "tiny.py"), "--fork", "logs/sgd@10"]):
        msg = assert_one_clean_message(run_main([*argv, "--store", str(db)], capsys), 1)
        assert "imported from" in msg and "read-only" in msg, msg


def test_a_step_logged_twice_keeps_its_last_value_and_several_runs_share_the_name(tmp_path: Path, capsys):
    logs = tmp_path / "logs"
    write_logs(logs / "a" / "first", {"loss": [(s, 1.0) for s in range(0, 50)]})
    write_logs(logs / "a" / "first", {"loss": [(s, 2.0) for s in range(30, 80)]}, t0=1.8e9)  # restarted at 30
    write_logs(logs / "b", {"loss": [(0, 3.0)]})
    db = tmp_path / "runs.sqlite"
    out = run_main(["import", str(logs), "--name", "sweep", "--store", str(db)], capsys)
    assert out.status == 0, out.stderr
    assert "20 points were logged again at a step already logged: the last one is kept" in out.stdout
    with RunStore(db) as store:
        assert sorted(r.name for r in store.list_runs()) == ["sweep/a/first", "sweep/b"]
        steps = store.load_steps(store.get_run("sweep/a/first").id)
        assert steps["step"].tolist() == list(range(80))
        assert steps["loss"].tolist() == [1.0] * 30 + [2.0] * 50
    (one_file,) = (logs / "b").iterdir()  # one event file: a run named after its folder
    assert run_main(["import", str(one_file), "--store", str(db)], capsys).status == 0
    with RunStore(db) as store:
        assert store.load_steps(store.get_run("b").id)["loss"].tolist() == [3.0]


def test_an_lrviz_run_exported_to_tensorboard_imports_back_equal(store: RunStore, tmp_path: Path, capsys):
    run = rich_run(store)
    run_main(["export", str(run), "--format", "tb", "--out", str(tmp_path / "tb"), "--store", str(store.path)],
             capsys)
    out = run_main(["import", str(tmp_path / "tb"), "--name", "back", "--store", str(store.path)], capsys)
    assert out.status == 0, out.stderr
    assert "loss  <- 'loss'" in out.stdout and "lr    <- 'lr', 'lr_1'" in out.stdout, out.stdout
    before, after = store.load_steps(run), store.load_steps(store.get_run("back").id)
    assert after["step"].tolist() == before["step"].tolist()
    assert all(same(a, f32(b)) for a, b in zip(after["loss"].tolist(), before["loss"].tolist(), strict=True))
    assert after["lr"].tolist() == before["lr"].astype(np.float32).astype(np.float64).tolist()
    scalars = store.load_scalars(store.get_run("back").id)
    assert scalars["val/top5"][1].tolist() == [f32(0.7), f32(0.8), f32(0.9)]
    assert scalars["grad_norm"][1].tolist() == before["grad_norm"].astype(np.float64).tolist()  # float32 already


# --------------------------------------------------------------------------- bad input


def test_bad_logs_get_one_message_each_and_import_nothing(tmp_path: Path, capsys):
    db = tmp_path / "runs.sqlite"

    def refused(path: Path, *flags: str) -> str:
        msg = assert_one_clean_message(run_main(["import", str(path), *flags, "--store", str(db)], capsys), 1)
        with RunStore(db) as s:
            assert s.list_runs() == []
        return msg

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("hello")
    assert "no TensorBoard event files" in refused(empty)
    assert "does not exist" in refused(tmp_path / "nowhere")

    no_scalars = tmp_path / "no_scalars"
    writer = EventFileWriter(str(no_scalars))  # a header and a text summary, no scalar
    text = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="notes", tensor=tensor_util.make_tensor_proto(
        "hi"), metadata=summary_pb2.SummaryMetadata(plugin_data={"plugin_name": "text"}))])
    writer.add_event(event_pb2.Event(step=1, wall_time=1.0, summary=text))
    writer.close()
    msg = refused(no_scalars)
    assert "1 event file but no scalars (they hold text (1 tag))" in msg, msg

    good = tmp_path / "good"
    write_logs(good, {"train_loss": [(s, 1.0 / (s + 1)) for s in range(50)], "acc": [(9, 0.5)]})
    (path,) = good.iterdir()
    data = path.read_bytes()

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / path.name).write_bytes(data[:-7])  # a writer killed in the middle of its last record
    msg = refused(cut)
    assert str(cut / path.name) in msg and "damaged" in msg and "--partial" in msg, msg
    out = run_main(["import", str(cut), "--partial", "--store", str(db)], capsys)
    assert out.status == 0 and "--partial:" in out.stdout, out.stdout + out.stderr
    with RunStore(db) as s:
        (info,) = s.list_runs()
        assert info.steps == 49 and info.summary["imported"]["damage"]  # all but the cut record
        s.delete_run(info.id)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / path.name).write_bytes(os.urandom(200))
    msg = refused(garbage)
    assert "damaged at record 1" in msg and "crc" in msg.lower(), msg

    msg = refused(good, "--loss", "val_loss")
    assert "--loss 'val_loss'" in msg and "'acc', 'train_loss'" in msg, msg
    msg = refused(good, "--lr", "lr")
    assert "--lr 'lr'" in msg and "its tags: 'acc', 'train_loss'" in msg, msg
    nothing_like = tmp_path / "nothing_like"
    write_logs(nothing_like, {"accuracy": [(0, 0.5)], "val_loss": [(0, 1.0)]})
    msg = refused(nothing_like)
    assert "no scalar tag looks like a training loss" in msg and "--loss TAG" in msg, msg
    assert run_main(["import", str(nothing_like), "--loss", "accuracy", "--store", str(db)], capsys).status == 0


def test_without_tensorboard_the_commands_say_how_to_install_it(store: RunStore, tmp_path: Path, capsys,
                                                                monkeypatch):
    run = rich_run(store)
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard"]:  # as if it were not installed
        monkeypatch.setitem(sys.modules, name, None)
    for argv in (["export", str(run), "--format", "csv,tb", "--out", str(tmp_path / "o")],
                 ["import", str(tmp_path)]):
        msg = assert_one_clean_message(run_main([*argv, "--store", str(store.path)], capsys), 1)
        assert "pip install 'lrviz[tensorboard]'" in msg, msg
    assert list((tmp_path / "o").iterdir()) == []  # refused before anything was written


def test_tensorboard_export_and_import_import_neither_torch_nor_qt(store: RunStore, tmp_path: Path):
    run = rich_run(store)
    code = f"""
import sys
from lrviz.store.runs import RunStore
from lrviz.export import export_run
from lrviz.tensorboard import import_logs
with RunStore({str(store.path)!r}) as s:
    export_run(s, {run}, {str(tmp_path / 'tb')!r}, "tb")
    import_logs(s, {str(tmp_path / 'tb')!r})
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'PySide6', 'pyqtgraph', 'tensorflow')]
assert not bad, bad
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
