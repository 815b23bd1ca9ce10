"""The built-in example scripts: where they are, which one the app opens first, and a name resolved
to a path. Torch-free, so the app (which never imports torch) can find them too."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from .errors import ScriptError

DEFAULT_EXAMPLE = "classification.py"


def examples_dir() -> Path:
    """The folder of the built-in example scripts."""
    return Path(str(importlib.resources.files("lrviz.resources") / "examples"))


#: A line that marks a file in the examples folder as a plain script (run with ``python``), not an
#: experiment script: example lists leave it out.
PLAIN_SCRIPT_MARK = "# lrviz: a plain script, not an experiment script"


def example_paths() -> list[Path]:
    """The built-in example scripts, sorted by name (plain scripts, marked so, left out)."""
    return sorted(p for p in examples_dir().glob("*.py") if not p.name.startswith("_") and not is_plain_script(p))


def is_plain_script(path: Path) -> bool:
    """Whether ``path`` says in its first lines that it is a plain script (:data:`PLAIN_SCRIPT_MARK`)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = [f.readline() for _ in range(20)]
    except OSError:
        return False
    return any(line.strip() == PLAIN_SCRIPT_MARK for line in head)


def default_experiment_path() -> Path:
    """The experiment the app opens with when no script is given."""
    return examples_dir() / DEFAULT_EXAMPLE


def resolve_script(ref: str | Path) -> Path:
    """A script path, or the name of a built-in example (``classification`` or ``classification.py``)."""
    p = Path(ref).expanduser()
    if p.exists():
        return p.resolve()
    name = p.name if p.suffix == ".py" else p.name + ".py"
    cand = examples_dir() / name
    if len(p.parts) == 1 and cand.exists():
        if is_plain_script(cand):
            raise ScriptError(f"{cand.name} is a plain training script, not an experiment script: run it with "
                              f"`python {cand}` (or `python -m lrviz.resources.examples.{cand.stem}`)", str(ref))
        return cand
    known = ", ".join(q.stem for q in example_paths())
    raise ScriptError(f"no such file (built-in examples: {known})", str(ref))
