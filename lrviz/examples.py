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


def example_paths() -> list[Path]:
    """The built-in example scripts, sorted by name."""
    return sorted(p for p in examples_dir().glob("*.py") if not p.name.startswith("_"))


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
        return cand
    known = ", ".join(q.stem for q in example_paths())
    raise ScriptError(f"no such file (built-in examples: {known})", str(ref))
