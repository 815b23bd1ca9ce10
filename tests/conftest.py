"""Test set-up shared by every test.

- Qt runs offscreen, and its settings (QSettings) live in a temporary folder, never the user's.
- Every test gets its own run store: ``LRVIZ_HOME`` points at a fresh temporary folder.
- A test that leaves a training thread ('lrviz-engine') or a QThread running fails: leftover threads
  are what make Qt test suites crash later, far from the cause (napari's ``_dangling_qthreads``).

Nothing here needs Qt: the core's tests run without PySide6 installed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
_CONFIG_HOME = tempfile.mkdtemp(prefix="lrviz-test-config-")
os.environ["XDG_CONFIG_HOME"] = _CONFIG_HOME  # QSettings' native format on Linux lives here

import pytest  # noqa: E402

try:
    from lrviz.ui import _compat  # noqa: F401  (PySide6 6.12 drops references to True on every emit)
    from PySide6.QtCore import QSettings, QThread
except ImportError:  # the core's tests run without Qt
    QSettings = QThread = None  # type: ignore[assignment,misc]

if QSettings is not None:
    for _fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(_fmt, QSettings.Scope.UserScope, _CONFIG_HOME)

#: How long a test's threads get to finish after it (a run told to stop ends within a step).
THREAD_GRACE_S = 3.0


@pytest.fixture(autouse=True)
def _lrviz_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A fresh, empty LRVIZ_HOME (so the default run store) for every test."""
    home = tmp_path_factory.mktemp("lrviz-home")
    monkeypatch.setenv("LRVIZ_HOME", str(home))
    return home


@pytest.fixture
def one_thread():
    """torch on one thread for the test: small models train faster so (and the suite shares 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_settings():
    """Start every test with empty lrviz settings (in the temporary config folder)."""
    if QSettings is not None:
        QSettings("lrviz", "lrviz").clear()
    yield


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: the models of the tests are tiny, and one thread is
    faster, far faster on shared cores. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_dangling_threads(monkeypatch: pytest.MonkeyPatch):
    """Fail a test that leaves an 'lrviz-engine' thread or a QThread running."""
    started: list = []
    if QThread is not None and "PySide6.QtCore" in sys.modules:
        original = QThread.start

        def start(self, *args, **kwargs):  # noqa: ANN001, ANN202
            started.append(self)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(QThread, "start", start)
    before = {t for t in threading.enumerate() if t.name == "lrviz-engine"}
    yield

    def leftovers() -> list[str]:
        out = [f"threading.Thread {t.name!r}" for t in threading.enumerate()
               if t.name == "lrviz-engine" and t.is_alive() and t not in before]
        for qt in started:
            try:
                if qt.isRunning():
                    out.append(f"QThread {qt!r}")
            except RuntimeError:  # its C++ object is gone: not running
                pass
        return out

    deadline = time.monotonic() + THREAD_GRACE_S
    left = leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = leftovers()
    if left:
        pytest.fail("the test left threads running: " + ", ".join(left), pytrace=False)
