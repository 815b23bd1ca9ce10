"""The core (lrviz/) never imports Qt: it imports and trains with PySide6 and pyqtgraph blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from qt_block import SOURCE

ROOT = Path(__file__).resolve().parents[1]

BLOCK_QT = SOURCE


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_QT + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_every_core_module_imports_with_qt_blocked():
    r = run_blocked(
        """
        import pkgutil, importlib, lrviz
        names = [m.name for m in pkgutil.iter_modules(lrviz.__path__, 'lrviz.')
                 if m.name not in ('lrviz.ui', 'lrviz.resources', 'lrviz.__main__')]
        for name in names:
            importlib.import_module(name)
        assert 'PySide6' not in sys.modules and 'pyqtgraph' not in sys.modules
        print(len(names), 'modules')
        """
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[0]) >= 10


@pytest.mark.slow
def test_core_trains_and_stores_with_qt_blocked(tmp_path):
    r = run_blocked(
        f"""
        from lrviz.cli import main
        rc = main(['run', 'regression', '--steps', '30', '--store', {str(tmp_path)!r},
                   '--out', {str(tmp_path / 'out')!r}, '--quiet'])
        assert rc == 0, rc
        assert 'PySide6' not in sys.modules
        """
    )
    assert r.returncode == 0, r.stderr
    assert "plots skipped" in r.stderr
    assert (tmp_path / "out" / "metrics.csv").exists() and (tmp_path / "out" / "run.json").exists()


def test_no_core_file_mentions_a_qt_import():
    bad = []
    for path in (ROOT / "lrviz").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith(("import ", "from ")) and any(
                    q in s.split("#")[0] for q in ("PySide6", "pyqtgraph", "shiboken6")):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {s}")
    assert bad == []  # the CLI too: it finds the app and the renderer by name (lrviz.plugins)


def test_the_core_does_not_name_the_ui_either():
    """Not even by string (importlib.import_module("lrviz.ui...")) or in a comment, the CLI included: the
    app and the plot renderer are entry points (pyproject.toml, group lrviz.plugins) that
    lrviz.plugins.load_plugin finds by name."""
    import re

    hits = []
    for path in sorted((ROOT / "lrviz").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""lrviz\.ui\b|^\s*(from|import)\s+(PySide6|pyqtgraph|shiboken6)\b""", line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, hits


@pytest.mark.qt
def test_the_app_and_the_renderer_are_found_by_name():
    """The entry points pyproject.toml declares resolve to the Qt layer's app and renderer (and the
    renderer registers itself for the core's exports when loaded)."""
    from lrviz import export
    from lrviz.plugins import load_plugin

    plots = load_plugin("plots")
    assert callable(plots.render_run) and callable(plots.render_range_test)
    assert export._load_render() is not None
    assert callable(load_plugin("app"))
    with pytest.raises(ImportError, match="not installed"):
        load_plugin("no-such-part")


def test_every_package_folder_is_packaged():
    """A wheel holds only the packages pyproject.toml lists (package-dir maps ui/ to lrviz.ui): every
    folder of Python modules must be listed, with its __init__.py, or the installed app lacks it."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    roots = {src: name for name, src in conf["package-dir"].items()}
    missing = []
    for src, name in roots.items():
        for init_dir in sorted({p.parent for p in (ROOT / src).rglob("*.py")}):
            if "__pycache__" in init_dir.parts:
                continue
            rel = init_dir.relative_to(ROOT / src)
            pkg = ".".join((name, *rel.parts))
            if not (init_dir / "__init__.py").exists() or pkg not in listed:
                missing.append(pkg)
    assert not missing, f"not packaged (add __init__.py and list them in pyproject.toml): {missing}"
