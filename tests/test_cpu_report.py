"""LRVIZ_TEST_CPU (tests/cpu_report.py): each test's own CPU and its ended children's, per file and per
test, over xdist's workers without counting a worker twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent

SUITE = """
    import subprocess, sys

    BURN = "x = 0\\nfor i in range(4_000_000):\\n    x += i"

    def test_burns_in_a_child():
        subprocess.run([sys.executable, "-c", BURN], check=True)

    def test_burns_itself():
        exec(BURN)

    def test_idles():
        pass
"""


@pytest.mark.slow
def test_the_cpu_report_names_each_tests_own_and_childrens_cpu_and_counts_xdist_workers_once(tmp_path):
    suite, report = tmp_path / "suite", tmp_path / "report"
    suite.mkdir()
    (suite / "conftest.py").write_text("import cpu_report\n\n\ndef pytest_configure(config):\n"
                                       "    cpu_report.plugin_from_env(config)\n")
    (suite / "test_burn.py").write_text(textwrap.dedent(SUITE))
    env = {**os.environ, "LRVIZ_TEST_CPU": str(report), "PYTHONPATH": str(HERE)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1", str(suite)],
                       cwd=suite, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows: dict[str, list[float]] = {}
    files = sorted(report.glob("*.jsonl"))
    assert len(files) == 2, files  # the controller's and its one worker's
    for path in files:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["test"].split("::")[-1], []).append((row["own"], row["children"]))
    [(child_own, child)] = rows["test_burns_in_a_child"]
    [(own, own_children)] = rows["test_burns_itself"]
    [(idle, idle_children)] = rows["test_idles"]
    assert child > 10 * max(idle, idle_children, 0.001) and child > 0.05, rows  # the child's CPU is its test's
    assert own > 10 * max(idle, own_children, 0.001) and own > 0.05, rows
    outside = rows["(outside tests)"]
    assert len(outside) == 2 and min(c for _, c in outside) == 0.0, outside  # the controller's children (the
    assert max(c for _, c in outside) < child, outside  # worker) are not counted again: only its own CPU
    assert "CPU per file and per test" in r.stdout and "test_burn.py::test_burns_in_a_child" in r.stdout
    again = subprocess.run([sys.executable, str(HERE / "cpu_report.py"), str(report)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "test_burn.py::test_burns_itself" in again.stdout, again.stderr
    assert again.stdout.splitlines()[0] in r.stdout  # the same totals
