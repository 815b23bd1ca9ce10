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
``python -m lrviz`` in a subprocess, and ``--debug`` is checked there to show a traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lrviz.cli import main
from lrviz.store import RunStore

CORPUS = Path(__file__).resolve().parent / "corpus"
OK = CORPUS / "ok.py"
STEPS = ("--steps", "6")


# --------------------------------------------------------------------------- the shared helper


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    store: Path

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    @property
    def message(self) -> str:
        return self.stderr.strip()


def _fill(argv: tuple[str, ...], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{corpus}", str(CORPUS)) for a in argv]


def run_lrviz(
    argv: list[str], store: Path, *, sub: bool = False, capsys=None, cwd: Path | None = None
) -> Outcome:
    """``lrviz run ARGV --store STORE``, in a subprocess (``sub``) or in-process through ``main``."""
    full = ["run", *argv, "--store", str(store)]
    if sub:
        env = dict(os.environ, LRVIZ_HOME=str(store.parent / "home"))
        p = subprocess.run(
            [sys.executable, "-m", "lrviz", *full],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=cwd or store.parent,
        )
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


def assert_one_clean_message(out: Outcome, status: int) -> str:
    assert out.status == status, f"exit status {out.status}, expected {status}; stderr:\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    assert len(out.lines) == 1, f"expected one message on stderr, got:\n{out.stderr}"
    msg = out.lines[0]
    assert msg.startswith("lrviz"), msg
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
]


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c.script.removesuffix(".py") for c in SCRIPT_CASES])
def test_broken_script(case: ScriptCase, store, capsys):
    path, seeded = store
    script = CORPUS / case.script
    out = run_lrviz([str(script), *STEPS, *case.flags], path, sub=case.sub, capsys=capsys)
    msg = assert_one_clean_message(out, case.status)
    if case.status == 1:
        assert msg.startswith("lrviz: error: ") and script.name in msg, msg
    for needle in case.needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in: {msg}"
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
    FlagCase("unknown-flag", ("--lrr", "0.1"), ("--lrr",), sub=True),
    FlagCase("out-under-a-file", ("--out", "{tmp}/notes.txt/run1"), ("--out", "notes.txt/run1"), sub=True),
    FlagCase("out-is-a-file", ("--out", "{tmp}/notes.txt"), ("--out", "notes.txt")),
    FlagCase("script-missing", ("{corpus}/no_such_script.py",), ("no_such_script.py", "no such file")),
    FlagCase("script-is-a-folder", ("{corpus}",), ("corpus", "cannot read")),
]


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c.id for c in FLAG_CASES])
def test_bad_flag(case: FlagCase, store, tmp_path, capsys):
    path, seeded = store
    (tmp_path / "notes.txt").write_text("not a folder\n")
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
