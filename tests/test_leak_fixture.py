"""The suite's leak check (tests/conftest.py, ``_no_leaks``) fails a test that leaves an ``lrviz-*``
thread, a child process or a running QTimer behind, and says where it was started; a test that ends
what it started passes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent

LEAKY = '''
import subprocess, sys, threading

import pytest

STOP = threading.Event()


def test_leaves_a_thread():
    threading.Thread(target=STOP.wait, args=(30,), name="lrviz-demo", daemon=True).start()


def test_leaves_a_child_process():  # it lives until this suite's process ends (its stdin closes)
    subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_leaves_a_running_timer(qtbot):
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QWidget

    KEPT.append(QWidget())
    QTimer(KEPT[-1]).start(1000)


KEPT = []


def test_ends_what_it_starts(qtbot):
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QWidget

    done = threading.Event()
    t = threading.Thread(target=done.wait, name="lrviz-tidy", daemon=True)
    t.start()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    w = QWidget()
    qtbot.addWidget(w)  # closed and deleted after the test: its timer goes with it
    QTimer(w).start(1000)
    done.set()
    proc.wait(60)
'''


@pytest.mark.slow
def test_the_leak_check_names_each_leftover_and_where_it_started(tmp_path: Path):
    pytest.importorskip("PySide6")
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("conftest.py", "qt_block.py"):
        shutil.copy(HERE / name, suite / name)
    (suite / "test_leaky.py").write_text(textwrap.dedent(LEAKY))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "-o", "qt_api=pyside6", str(suite)], cwd=suite, capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items() if k != "LRVIZ_TEST_CPU"})  # no report
    out = r.stdout
    assert r.returncode == 1, out
    assert "4 passed, 3 errors" in out, out  # the leaks fail at teardown; the tidy test passes
    assert "thread 'lrviz-demo', started at:" in out and "in test_leaves_a_thread\n    threading.Thread(" in out
    assert "in test_leaves_a_child_process\n    subprocess.Popen(" in out
    assert "running QTimer of QWidget, started at:" in out
    assert "in test_leaves_a_running_timer\n    QTimer(KEPT[-1]).start(1000)" in out
    assert "test_ends_what_it_starts" not in out.split("short test summary info")[-1]
