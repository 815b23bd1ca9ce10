"""docs/dev/architecture.md stays true: every path it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "dev" / "architecture.md"


def named_paths(text: str) -> list[str]:
    """The code spans that are repository paths: a top-level folder of the repo, then ``/...``
    (``tests/x.py::test_y`` names the file)."""
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    out = []
    for span in re.findall(r"`([^`\s]+)`", text):
        path = span.split("::")[0]
        if "/" in path and path.split("/")[0] in tops:
            out.append(path)
    return out


def test_every_path_the_architecture_page_names_exists():
    paths = named_paths(DOC.read_text())
    assert len(paths) > 30  # the page names its rooms; an empty list would prove nothing
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == [], f"docs/dev/architecture.md names paths that do not exist: {missing}"


def test_the_check_sees_a_missing_path():
    assert named_paths("see `lrviz/no_such_module.py` and `ui/plots.py`") == ["lrviz/no_such_module.py",
                                                                                "ui/plots.py"]
    assert not (ROOT / "lrviz/no_such_module.py").exists()
