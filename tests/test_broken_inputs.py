"""Broken inputs through the real CLI: every one is reported, none crashes, the run store survives.

Each case runs ``lrviz run ...`` on a script of ``tests/corpus/`` (one broken script per case) or on
the healthy ``corpus/ok.py`` with a bad flag, against a copy of a run store that already holds one
finished run. The contract checked for every case (DESIGN.md, "Command line" and "The experiment
script"):

* exit status 1 (2 when the run diverged);
* exactly one message on stderr, ``lrviz...``, with no traceback; it names the script (and the
  line, where the cause is at a line of the script) or the setting, and the cause;
* the store passes SQLite's integrity check and still lists the earlier run unchanged; a run the
  case created is marked failed/diverged with the error (and an error/diverged event), never left
  'created'/'running'; a case that fails before training creates no run at all.

Most cases run in-process (``lrviz.cli.main``) for speed; the ones marked ``sub`` run
``python -m lrviz`` in a process of its own, forked from the test's (tests/forked_cli.py: its own
stderr, logging and exit status, without a new interpreter's torch import), and ``--debug`` is checked
there to show a traceback. The read-only and busy stores start ``python -m lrviz`` itself (under
setpriv; Ctrl+C sent from outside).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from forked_cli import lrviz_forked
from store_events import stored_steps, wait_for_running_steps, wait_until

from lrviz.cli import main
from lrviz.errors import StoreError
from lrviz.store.runs import RunStore

CORPUS = Path(__file__).resolve().parent / "corpus"
OK = CORPUS / "ok.py"
STEPS = ("--steps", "6")


# --------------------------------------------------------------------------- the shared helper


#: A line of ``lrviz run``'s progress (lrviz.cli.common.Progress.line).
PROGRESS_LINE = re.compile(r"step \d+(/\d+ \(\d+%\))?(  |$)")


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    store: Path

    @property
    def lines(self) -> list[str]:
        """The messages on stderr: every non-blank line but the progress lines, which ``lrviz run``
        prints every PROGRESS_EVERY seconds while it trains (a loaded machine takes that long to
        reach the broken part of a script)."""
        return [ln for ln in self.stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]

    @property
    def message(self) -> str:
        return self.stderr.strip()


def _fill(argv: tuple[str, ...], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{corpus}", str(CORPUS)) for a in argv]


def run_lrviz(
    argv: list[str], store: Path, *, sub: bool = False, capsys=None, cwd: Path | None = None
) -> Outcome:
    """``lrviz run ARGV --store STORE``, in a process of its own (``sub``: forked, tests/forked_cli.py) or
    in-process through ``main``."""
    full = ["run", *argv, "--store", str(store)]
    if sub:
        env = dict(os.environ, LRVIZ_HOME=str(store.parent / "home"))
        p = lrviz_forked(full, cwd=cwd or store.parent, env=env, timeout=120)
        return Outcome(p.returncode, p.stdout, p.stderr, store)
    assert capsys is not None
    capsys.readouterr()
    try:
        status = main(full)
    except SystemExit as exc:  # argparse exits; a process would end with this status
        status = exc.code if isinstance(exc.code, int) else 1
    cap = capsys.readouterr()
    return Outcome(status, cap.out, cap.err, store)


def line_no(script: Path, text: str) -> int:
    """The 1-based number of the first line of ``script`` containing ``text``."""
    for i, ln in enumerate(script.read_text().splitlines(), 1):
        if text in ln:
            return i
    raise AssertionError(f"{text!r} not in {script}")


@dataclass(frozen=True)
class Seeded:
    id: int
    steps: int
    name: str


@pytest.fixture(scope="session")
def template_store(tmp_path_factory) -> tuple[Path, Seeded]:
    """A store holding one finished run of ok.py, made by the CLI itself (copied per test)."""
    folder = tmp_path_factory.mktemp("template")
    store = folder / "runs.sqlite"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["run", str(OK), "--steps", "3", "--quiet", "--store", str(store), "--name", "earlier"])
    assert status == 0, f"the healthy corpus/ok.py failed, so no case can be judged: {err.getvalue()}"
    with RunStore(store) as s:
        (info,) = s.list_runs()
        assert info.status == "finished" and info.steps == 3
        return folder, Seeded(info.id, info.steps, info.name)


@pytest.fixture
def store(template_store, tmp_path, monkeypatch) -> tuple[Path, Seeded]:
    folder, seeded = template_store
    dest = tmp_path / "store"
    shutil.copytree(folder, dest)
    monkeypatch.setenv("LRVIZ_HOME", str(tmp_path / "home"))  # nothing may land in the user's data folder
    return dest / "runs.sqlite", seeded


#: A message a person reads: no input echoed in full (a 120 KB schedule once was).
MAX_MESSAGE = 1500


def assert_one_clean_message(out: Outcome, status: int) -> str:
    assert out.status == status, f"exit status {out.status}, expected {status}; stderr:\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    assert len(out.lines) == 1, f"expected one message on stderr, got:\n{out.stderr}"
    msg = out.lines[0]
    assert msg.startswith("lrviz"), msg
    assert len(msg) <= MAX_MESSAGE, f"a message of {len(msg)} characters: {msg[:300]}..."
    return msg


def assert_store_intact(out: Outcome, seeded: Seeded, created: str | None) -> None:
    """Integrity, the earlier run untouched, and the case's own run (if any) marked with the error."""
    with RunStore(out.store) as s:
        assert s.integrity_ok()
        runs = {r.id: r for r in s.list_runs()}
        assert seeded.id in runs, "the earlier run disappeared"
        old = runs[seeded.id]
        assert (old.status, old.steps, old.name) == ("finished", seeded.steps, seeded.name)
        assert len(s.load_steps(seeded.id)["loss"]) == seeded.steps
        new = [r for r in runs.values() if r.id != seeded.id]
        for r in new:
            assert r.status in ("failed", "diverged"), f"run {r.id} left {r.status!r}"
            assert r.error, f"run {r.id} has no error stored"
        if created is None:
            assert not new, f"a run was created for an input rejected before training: {new}"
            return
        assert len(new) == 1, new
        (run,) = new
        assert run.status == created
        assert run.error in out.message, (run.error, out.message)
        kinds = [e.kind for e in s.load_events(run.id)]
        assert ("error" if created == "failed" else "diverged") in kinds, kinds


# --------------------------------------------------------------------------- broken scripts


@dataclass(frozen=True)
class ScriptCase:
    script: str
    needles: tuple[str, ...]
    """Case-insensitive substrings the message must hold (the cause)."""
    lines: tuple[str, ...] = ()
    """The message must name ``script:N`` for a line containing one of these (empty: no line needed)."""
    created: str | None = None
    """Status of the run the case creates ('failed', 'diverged'), or None when it fails before training."""
    status: int = 1
    sub: bool = False
    flags: tuple[str, ...] = ("--quiet",)
    absent: tuple[str, ...] = ()
    """Case-insensitive substrings the message must not hold (advice that would mislead)."""
    name: str = ""
    """The test id, when the script alone does not tell the case."""

    @property
    def id(self) -> str:
        return self.name or self.script.removesuffix(".py")


SCRIPT_CASES = [
    ScriptCase("syntax_error.py", ("syntax error",), lines=("def build_data(:",), sub=True),
    ScriptCase(
        "import_error.py",
        ("ModuleNotFoundError", "nonexistent_pkg_for_lrviz_tests"),
        lines=("# IMPORT LINE",),
        sub=True,
    ),
    ScriptCase("missing_build_model.py", ("build_model",)),
    ScriptCase("exits_on_import.py", ("exit",), lines=("sys.exit(main())",)),
    ScriptCase("defaults_unknown_key.py", ("DEFAULTS", "learning_rate")),
    # a bad value in DEFAULTS must say it came from the script's DEFAULTS, not look like a bad flag
    ScriptCase("defaults_bad_value.py", ("DEFAULTS", "lr", "fast")),
    ScriptCase(
        "build_data_raises.py",
        ("build_data", "FileNotFoundError", "features.pt"),
        lines=('torch.load("/nonexistent',),
    ),
    ScriptCase("data_returns_int.py", ("build_data", "int"), lines=("def build_data", "return len(batches)")),
    ScriptCase(
        "data_returns_triple.py",
        ("build_data", "3 items"),
        lines=("def build_data", "return train, val, test"),
    ),
    # a dict is iterable (over its keys) but is never training data: say so, not "a batch is a str"
    ScriptCase("data_returns_dict.py", ("build_data", "dict"), lines=("def build_data", "return {")),
    ScriptCase("generator_data.py", ("one-shot", "generator"), lines=("def build_data", "return ((x")),
    ScriptCase(
        "model_not_module.py", ("build_model", "nn.Module"), lines=("def build_model", "return lambda")
    ),
    ScriptCase(
        "optimizer_not_optimizer.py",
        ("build_optimizer", "NoneType", "Optimizer"),
        lines=("def build_optimizer", "torch.optim.SGD("),
    ),
    ScriptCase("empty_data.py", ("no batches",), lines=("def build_data", "DataLoader(ds"), created="failed"),
    ScriptCase("loss_shape_mismatch.py", ("size of tensor",), lines=("# LOSS LINE",), created="failed"),
    # the shape error is raised inside torch's Linear: point at the model or the data, not at nothing
    ScriptCase(
        "input_width_mismatch.py",
        ("mat1 and mat2",),
        lines=("def build_model", "return nn.Linear", "def build_data", "torch.randn(8, 5)"),
        created="failed",
    ),
    ScriptCase(
        "batch_not_pair.py",
        ("3 items", "(inputs, targets)", "compute_loss"),
        lines=("def build_data", "return [(x, x.sum(1, keepdim=True), weights)]"),
        created="failed",
    ),
    ScriptCase(
        "loss_not_scalar.py",
        ("loss_fn", "scalar", "[8, 1]"),
        lines=("def loss_fn", "return (output - target) ** 2"),
        created="failed",
    ),
    ScriptCase(
        "data_fails_epoch2.py",
        ("epoch 2", "FileNotFoundError", "shard-0001.pt"),
        lines=("# DATA LINE",),
        created="failed",
        sub=True,
        flags=(),
    ),
    ScriptCase(
        "model_fails_epoch2.py",
        ("step 2", "epoch 2", "RuntimeError", "buffer overflow"),
        lines=("# MODEL LINE",),
        created="failed",
    ),
    ScriptCase(
        "val_batch_broken.py",
        ("validation", "3 items"),
        lines=("def build_data", 'return [(x, y)], [(x, y, "id")]'),
        created="failed",
    ),
    ScriptCase("nan_loss.py", ("diverged", "nan", "step 3"), created="diverged", status=2, sub=True),
    # a batch of 0 samples gives a NaN mean: the rate is not the cause, so no advice to lower it
    ScriptCase(
        "empty_batch.py",
        ("step 1", "gradient of exactly 0", "empty batch"),
        lines=("def build_data", "return [(x[:8], y[:8]), (x[8:8]"),
        created="failed",
        absent=("too high", "lower"),
    ),
    # NaN at step 0 comes before any update: the rate cannot have caused it
    ScriptCase(
        "nan_first_batch.py",
        ("step 0", "before any update", "did not cause"),
        lines=("loss_fn = nn.MSELoss()",),
        created="failed",
        absent=("too high",),
    ),
    # a rate beyond float32's range makes torch refuse the update: the run diverged, the script is fine
    ScriptCase(
        "ok.py",
        ("diverged", "1e+300", "float32"),
        created="diverged",
        status=2,
        flags=("--lr", "1e300", "--quiet"),
        name="lr-1e300-diverges",
    ),
    ScriptCase("exit_in_loss.py", ("exit(3)", "step 2", "failed"), lines=("sys.exit(3)",), created="failed", sub=True),
    ScriptCase(
        "probe_returns_text.py",
        ("probe()", "dict", "weight norm"),
        lines=("def probe", 'return f"weight norm'),
        created="failed",
    ),
]


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c.id for c in SCRIPT_CASES])
def test_broken_script(case: ScriptCase, store, capsys):
    path, seeded = store
    script = CORPUS / case.script
    out = run_lrviz([str(script), *STEPS, *case.flags], path, sub=case.sub, capsys=capsys)
    msg = assert_one_clean_message(out, case.status)
    if case.status == 1:
        assert msg.startswith("lrviz: error: ") and script.name in msg, msg
    for needle in case.needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in: {msg}"
    for wrong in case.absent:
        assert wrong.lower() not in msg.lower(), f"{wrong!r} in: {msg}"
    if case.lines:
        wanted = sorted({line_no(script, t) for t in case.lines})
        assert any(f"{script.name}:{n}:" in msg for n in wanted), (
            f"the message names none of the lines {wanted} of {script.name}: {msg}"
        )
    assert_store_intact(out, seeded, case.created)


# --------------------------------------------------------------------------- bad flags and paths


@dataclass(frozen=True)
class FlagCase:
    id: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    sub: bool = False


FLAG_CASES = [
    FlagCase("lr-negative", ("--lr", "-1"), ("learning rate", "-1")),
    FlagCase("lr-nan", ("--lr", "nan"), ("learning rate", "nan")),
    FlagCase("lr-text", ("--lr", "abc"), ("learning rate", "abc")),
    FlagCase("lr-zero", ("--lr", "0"), ("learning rate", "0")),
    FlagCase("optimizer-unknown", ("--optimizer", "lion"), ("optimizer", "lion", "sgd")),
    FlagCase("schedule-unknown", ("--schedule", "Bogus:x=1"), ("schedule", "Bogus")),
    FlagCase("schedule-bad-value", ("--schedule", "StepLR:step_size=abc"), ("StepLR", "step_size", "abc")),
    FlagCase("schedule-bad-arg", ("--schedule", "StepLR:step_size=10,gama=0.5"), ("StepLR", "gama")),
    FlagCase("schedule-missing-arg", ("--schedule", "StepLR:gamma=0.5"), ("StepLR", "step_size")),
    FlagCase("steps-zero", ("--steps", "0"), ("steps", "0")),
    FlagCase("steps-text", ("--steps", "many"), ("steps", "many")),
    FlagCase("epochs-zero", ("--epochs", "0"), ("epochs", "0")),
    FlagCase("momentum-too-big", ("--momentum", "1.5"), ("momentum", "1.5")),
    FlagCase("weight-decay-nan", ("--weight-decay", "nan"), ("weight decay", "nan")),
    FlagCase("device-unknown", ("--device", "tpu"), ("device", "tpu")),
    FlagCase("seed-text", ("--seed", "x"), ("seed", "x")),
    FlagCase("seed-huge", ("--seed", "1" + "0" * 30), ("seed", "whole number", "18446744073709551615")),
    FlagCase("param-unknown", ("--param", "foo=1"), ("--param", "foo")),
    FlagCase("batch-size-unsupported", ("--batch-size", "8"), ("--batch-size", "batch_size")),
    FlagCase("at-unknown-setting", ("--at", "5:foo=1"), ("--at", "foo")),
    FlagCase("at-bad-step", ("--at", "x:lr=0.1"), ("--at", "step")),
    FlagCase("at-no-value", ("--at", "5"), ("--at",)),
    # argparse reads "-1:lr=0.1" as an option: still a bad setting (exit 1), not exit 2 ("diverged")
    FlagCase("at-negative-step", ("--at", "-1:lr=0.1"), ("--at",)),
    # a bad value inside --at must name the --at it came from (the run also has its own --lr)
    FlagCase("at-bad-lr", ("--at", "2:lr=-1"), ("--at", "learning rate", "-1")),
    FlagCase("at-bad-schedule", ("--at", "2:schedule=Nope"), ("--at", "Nope")),
    # the run has 3 steps (0..2): an --at at step 3 would be dropped silently
    FlagCase("at-past-the-end", ("--at", "3:lr=0.1"), ("--at", "past the end", "0..2")),
    # a 120 KB schedule: the message names the problem and echoes a short piece of it
    FlagCase("schedule-huge", ("--schedule", "StepLR:step_size=10" + ",x=1" * 30_000), ("StepLR", "x", "characters")),
    FlagCase("unknown-flag", ("--lrr", "0.1"), ("--lrr",), sub=True),
    FlagCase("out-under-a-file", ("--out", "{tmp}/notes.txt/run1"), ("--out", "notes.txt/run1"), sub=True),
    FlagCase("out-is-a-file", ("--out", "{tmp}/notes.txt"), ("--out", "notes.txt")),
    FlagCase("script-missing", ("{corpus}/no_such_script.py",), ("no_such_script.py", "no such file")),
    FlagCase("script-is-a-folder", ("{corpus}",), ("corpus", "cannot read")),
    # a text file that happens to compile as Python (a comment) used to end in an AttributeError traceback
    FlagCase("script-not-python", ("{tmp}/todo.txt",), ("todo.txt", "not a Python script")),
]


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c.id for c in FLAG_CASES])
def test_bad_flag(case: FlagCase, store, tmp_path, capsys):
    path, seeded = store
    (tmp_path / "notes.txt").write_text("not a folder\n")
    (tmp_path / "todo.txt").write_text("# todo: try a lower rate\n")
    argv = _fill(case.argv, tmp_path)
    if not case.id.startswith("script-"):
        argv = [str(OK), "--steps", "3", "--quiet", *argv]
        if case.argv[0] in ("--steps", "--epochs"):
            argv.remove("--steps")
            argv.remove("3")
    else:
        argv = [*argv, "--steps", "3", "--quiet"]
    out = run_lrviz(argv, path, sub=case.sub, capsys=capsys)
    msg = assert_one_clean_message(out, 1)
    assert msg.startswith("lrviz: error: "), msg
    for needle in case.needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in: {msg}"
    assert_store_intact(out, seeded, None)
    assert (tmp_path / "notes.txt").read_text() == "not a folder\n"


def test_store_path_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the store's folder should be\n")
    out = run_lrviz([str(OK), "--steps", "3", "--quiet"], blocker / "runs.sqlite", capsys=capsys)
    msg = assert_one_clean_message(out, 1)
    assert "run store" in msg and str(blocker) in msg, msg
    assert blocker.read_text() == "a file where the store's folder should be\n"


def test_store_that_is_not_a_database_is_left_alone(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my lab notes, not a database\n" * 200)
    before = notes.read_bytes()
    out = run_lrviz([str(OK), "--steps", "3", "--quiet"], notes, capsys=capsys)
    msg = assert_one_clean_message(out, 1)
    assert "notes.txt" in msg and "store" in msg, msg
    assert notes.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_failures_accumulate_in_one_store(store, capsys):
    """Several broken runs into one store, then a good one: all listed, each with its own status."""
    path, seeded = store
    for script, status in (("model_fails_epoch2.py", 1), ("nan_loss.py", 2), ("empty_data.py", 1)):
        out = run_lrviz([str(CORPUS / script), *STEPS, "--quiet"], path, capsys=capsys)
        assert_one_clean_message(out, status)
    assert run_lrviz([str(OK), *STEPS, "--quiet"], path, capsys=capsys).status == 0
    with RunStore(path) as s:
        assert s.integrity_ok()
        runs = s.list_runs()
        assert [r.status for r in runs] == ["finished", "failed", "diverged", "failed", "finished"]
        assert runs[-1].id == seeded.id
        assert runs[0].steps == 6 and runs[2].steps == 4  # the diverged run kept its steps, NaN included


# --------------------------------------------------------------------------- --debug


def test_debug_shows_the_traceback_of_a_script_error(tmp_path):
    out = run_lrviz(
        [str(CORPUS / "syntax_error.py"), "--quiet", "--debug"], tmp_path / "runs.sqlite", sub=True
    )
    assert out.status == 1, out.stderr
    assert "Traceback" in out.stderr
    assert "syntax error" in out.stderr and "syntax_error.py:" in out.stderr


def test_debug_traceback_reaches_the_users_line(store):
    path, seeded = store
    script = CORPUS / "model_fails_epoch2.py"
    out = run_lrviz([str(script), *STEPS, "--quiet", "--debug"], path, sub=True)
    assert out.status == 1, out.stderr
    assert "Traceback" in out.stderr
    assert f'File "{script}", line {line_no(script, "# MODEL LINE")}' in out.stderr
    assert "buffer overflow in the custom layer" in out.stderr
    with RunStore(path) as s:
        assert s.integrity_ok()
        statuses = {r.id: r.status for r in s.list_runs()}
    assert statuses.pop(seeded.id) == "finished"
    assert list(statuses.values()) == ["failed"]


# --------------------------------------------------------------------------- commands and stores


def run_main(argv: list[str], capsys=None, sub: bool = False) -> Outcome:
    """``lrviz ARGV`` (any command) in-process, or in a process of its own (``sub``: forked, its log lines
    show there)."""
    store = Path(argv[argv.index("--store") + 1]) if "--store" in argv else Path()
    if sub:
        p = lrviz_forked(argv, timeout=120)
        return Outcome(p.returncode, p.stdout, p.stderr, store)
    capsys.readouterr()
    status = main(argv)
    cap = capsys.readouterr()
    return Outcome(status, cap.out, cap.err, store)


@pytest.mark.parametrize("word,hint", [("bogus-command", None), ("rnu", "lrviz run"), ("expotr", "lrviz export")])
def test_unknown_command_is_a_usage_error(word, hint, capsys, monkeypatch):
    """argparse's convention: exit status 2, one message; never the app (which used to open, and hang
    headless)."""
    import lrviz.cli

    def no_app(argv):  # noqa: ANN001, ANN202
        raise AssertionError(f"lrviz {word} opened the desktop app")

    monkeypatch.setattr(lrviz.cli, "_app", no_app)
    out = run_main([word], capsys)
    msg = assert_one_clean_message(out, 2)
    assert f"unknown command '{word}'" in msg and "run, replay" in msg, msg
    if hint:
        assert f"did you mean `{hint}`" in msg, msg


def test_a_script_name_or_an_example_still_opens_the_app(tmp_path, capsys, monkeypatch):
    import lrviz.cli

    opened = []
    monkeypatch.setattr(lrviz.cli, "_app", lambda argv: opened.append(argv) or 0)
    script = tmp_path / "model_without_suffix"
    script.write_text("# a script\n")
    for argv in (["regression"], [str(OK)], [str(script)], []):
        assert run_main(argv, capsys).status == 0
    assert opened == [["regression"], [str(OK)], [str(script)], []]


def _page_of(db: Path, table: str) -> int:
    with sqlite3.connect(db) as c:
        page = c.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
        size = c.execute("PRAGMA page_size").fetchone()[0]
    return (page - 1) * size + (100 if page == 1 else 0)


def test_runs_of_a_store_whose_run_table_is_damaged(store):
    """Garbage over the runs table's page: one message (it used to be a warning, then the error)."""
    path, _ = store
    with path.open("r+b") as f:
        f.seek(_page_of(path, "runs") + 8)
        f.write(b"\xff" * 400)
    out = run_main(["runs", "--store", str(path)], sub=True)
    msg = assert_one_clean_message(out, 1)
    assert "damaged" in msg and str(path) in msg and "move the file aside" in msg, msg


def test_runs_of_a_store_whose_run_row_decodes_as_nulls(store):
    """The shape behind a flake of the test above: a damaged cell pointer of the runs table's page was
    followed to the page's end and the record decoded from whatever memory lies past it, which in some
    processes reads as a row of NULLs (rowid 104, name NULL: "internal error ... TypeError: 'NoneType'
    object is not subscriptable"). Made deterministic here: the pointer leads into the page's free space,
    zeroed, where SQLite decodes an empty record, a row whose NOT NULL columns are all NULL."""
    path, _ = store
    with contextlib.closing(sqlite3.connect(path)) as c:
        number = c.execute("SELECT rootpage FROM sqlite_master WHERE name='runs'").fetchone()[0]
        size = c.execute("PRAGMA page_size").fetchone()[0]
    page = (number - 1) * size
    start = page + (100 if number == 1 else 0)  # a leaf page: flag, ..., cell count, content start, pointers
    with path.open("r+b") as f:
        f.seek(start)
        head = f.read(8)
        assert head[0] == 0x0D and int.from_bytes(head[3:5], "big") == 1, "not a leaf page of one row"
        free_from, free_to = start - page + 8 + 2, int.from_bytes(head[5:7], "big")  # offsets in the page
        assert free_to - free_from > 16, (free_from, free_to)
        f.seek(page + free_from)
        f.write(b"\0" * (free_to - free_from))
        f.seek(start + 8)
        f.write(((free_from + free_to) // 2).to_bytes(2, "big"))
    out = run_main(["runs", "--store", str(path)], sub=True)
    msg = assert_one_clean_message(out, 1)
    assert "damaged" in msg and str(path) in msg and "move the file aside" in msg, msg
    with pytest.raises(StoreError, match="move the file aside") as caught:
        with RunStore(path) as s:
            s.list_runs()
    assert caught.value.kind == "damaged"


def test_runs_lists_a_store_with_one_damaged_run(store, capsys, tmp_path):
    """A damaged field of one run: the listing still shows every run, with one warning line naming it;
    reading the damaged parts is one message, never a traceback."""
    path, seeded = store
    assert run_lrviz([str(OK), *STEPS, "--quiet"], path, capsys=capsys).status == 0
    with sqlite3.connect(path) as c:
        c.execute("UPDATE runs SET config='{\"lr\": 0.1', summary='[' WHERE id=?", (seeded.id,))
        c.execute("UPDATE chunks SET data=zeroblob(length(data)) WHERE run_id=?", (seeded.id,))
    out = run_main(["runs", "--store", str(path)], sub=True)
    assert out.status == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert [ln for ln in out.lines if "WARNING" in ln] == out.lines and len(out.lines) == 1, out.stderr
    assert f"the config of run {seeded.id}" in out.stderr and "damaged" in out.stderr
    listed = [ln.split()[0] for ln in out.stdout.splitlines()[1:]]
    assert listed == ["2", str(seeded.id)], out.stdout
    out = run_main(["export", str(seeded.id), "--store", str(path), "--out", str(tmp_path / "x"),
                    "--format", "csv"], capsys)
    msg = assert_one_clean_message(out, 1)
    assert "damaged" in msg and f"run {seeded.id}" in msg, msg


def _read_only_runner(tmp_path: Path):
    """A way to run ``python -m lrviz`` that cannot write to a 0555 folder or a 0444 file: as this user when
    it is not root, else as root without CAP_DAC_OVERRIDE (setpriv), else skip."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: no way to make a folder read-only")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    p = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"], capture_output=True)
    probe.chmod(0o755)
    if p.returncode == 0:
        pytest.skip("this machine lets the test user write into a read-only folder")

    def run(*argv: str) -> Outcome:
        env = dict(os.environ, LRVIZ_HOME=str(tmp_path / "home"))
        p = subprocess.run([*prefix, sys.executable, "-m", "lrviz", *argv], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)
        return Outcome(p.returncode, p.stdout, p.stderr, Path())

    return run


def test_a_read_only_store_is_listed_and_exported_but_not_written(store, tmp_path):
    path, seeded = store
    folder = path.parent
    for f in folder.glob("runs.sqlite-*"):  # a store closed cleanly: no -wal/-shm, so SQLite needs to create them
        f.unlink()
    before = path.read_bytes()
    run = _read_only_runner(tmp_path)
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        listed = run("runs", "--store", str(path))
        exported = run("export", str(seeded.id), "--store", str(path), "--out", str(tmp_path / "exp"),
                       "--format", "csv,json")
        refused = run("run", str(OK), *STEPS, "--quiet", "--store", str(path))
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    assert listed.status == 0 and listed.stderr == "", listed.stderr
    assert seeded.name in listed.stdout and "finished" in listed.stdout
    assert exported.status == 0, exported.stderr
    assert len((tmp_path / "exp" / "metrics.csv").read_text().splitlines()) == 1 + seeded.steps
    msg = assert_one_clean_message(refused, 1)
    assert "read-only" in msg and "--store" in msg, msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(["runs.sqlite", "checkpoints"])


def test_a_busy_store_is_a_line_not_a_traceback(store, tmp_path):
    """Another writer holds the store's lock past the busy timeout while a run trains: the writer's
    failed flushes are one log line each (no traceback without --debug), it retries, nothing is lost."""
    path, _ = store
    code = textwrap.dedent(f"""
        import sys
        import lrviz.store.runs
        lrviz.store.runs.BUSY_TIMEOUT_S = 0.3  # the real 15 s, shortened
        from lrviz.cli import main
        sys.exit(main(["run", {str(OK)!r}, "--steps", "10000000", "--quiet", "--store", {str(path)!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        run_id = wait_for_running_steps(path, alive)
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        first = proc.stderr.readline()  # the writer's first failed flush
        lock.execute("ROLLBACK")
        lock.close()
        before = stored_steps(path, run_id)
        wait_until("the writer catching up", lambda: stored_steps(path, run_id) > before, alive)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "ERROR: writing the run to the store failed; will retry: the run store" in first, first
    assert "locked" in first and "Traceback" not in first + rest, first + rest
    assert proc.returncode == 130, rest
    with RunStore(path) as s:
        assert s.integrity_ok()
        info = s.get_run(run_id)
        steps = s.load_steps(run_id)["step"]
    assert info.status == "stopped"
    assert np.array_equal(steps, np.arange(info.steps)) and info.steps > before


def test_keyboard_interrupt_raised_in_loss_fn_stops_the_run(store, capsys):
    """Saved as stopped (not left 'running'), said in one line with the place, exit status 130."""
    path, seeded = store
    script = CORPUS / "interrupt_in_loss.py"
    out = run_lrviz([str(script), *STEPS, "--quiet"], path, sub=True)
    assert out.status == 130, out.stderr
    assert "Traceback" not in out.stderr and len(out.lines) == 1, out.stderr
    where = f"interrupt_in_loss.py:{line_no(script, 'raise KeyboardInterrupt')}"
    assert "stopped" in out.message and f"KeyboardInterrupt raised at {where}" in out.message, out.message
    with RunStore(path) as s:
        assert s.integrity_ok()
        (run,) = [r for r in s.list_runs() if r.id != seeded.id]
        assert run.status == "stopped" and run.steps == 2
        stop = [e for e in s.load_events(run.id) if e.kind == "stop"]
        assert stop and stop[-1].data == {"reason": "KeyboardInterrupt", "where": where}
