"""Test set-up shared by every test.

- Qt runs offscreen, and its settings (QSettings) live in a temporary folder, never the user's.
- Every test gets its own run store: ``LRVIZ_HOME`` points at a fresh temporary folder.
- ``LRVIZ_TEST_CPU=DIR`` reports where the suite's CPU goes, per test and per file (tests/cpu_report.py).
- A test that leaves an ``lrviz-*`` thread, a child process, a QThread or a running QTimer behind fails,
  with where each was started (``_no_leaks``).

Nothing here needs Qt: the core's tests run without PySide6 installed. ``LRVIZ_TEST_NO_QT=1`` makes
PySide6, pyqtgraph and lrviz.ui unimportable here (tests/qt_block.py), as .ci/test runs the core's tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
_CONFIG_HOME = tempfile.mkdtemp(prefix="lrviz-test-config-")
os.environ["XDG_CONFIG_HOME"] = _CONFIG_HOME  # QSettings' native format on Linux lives here

import pytest  # noqa: E402

if os.environ.get("LRVIZ_TEST_NO_QT"):  # the core's tests as on a machine without Qt (.ci/test)
    import qt_block

    qt_block.install()

try:
    from lrviz.ui import _compat  # noqa: F401  (PySide6 6.12 drops references to True on every emit)
    from PySide6.QtCore import QSettings, QThread
except ImportError:  # the core's tests run without Qt
    QSettings = QThread = None  # type: ignore[assignment,misc]

if QSettings is not None:
    for _fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(_fmt, QSettings.Scope.UserScope, _CONFIG_HOME)

def pytest_configure(config: pytest.Config) -> None:
    """``LRVIZ_TEST_CPU=DIR``: report each test's CPU, its children's included (tests/cpu_report.py)."""
    if os.environ.get("LRVIZ_TEST_CPU"):
        import cpu_report

        cpu_report.plugin_from_env(config)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--after-core", action="store_true",
                     help="leave out the core's tests that the Qt-blocked run already ran (those outside "
                          "tests/ui marked neither slow nor qt): .ci/test's second run")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``--after-core``, a core test file that marks nothing slow or qt holds only tests the
    Qt-blocked run already ran: not even imported (collecting one costs its imports in every worker,
    Lightning's ~4 s). A file that mentions neither word cannot mark a test with them."""
    if (config.getoption("--after-core") and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")
            and (Path(__file__).parent / "ui") not in collection_path.parents):
        text = collection_path.read_text(errors="replace")
        if "slow" not in text and "qt" not in text:
            return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``qt`` (the core's commands that also draw) are skipped where Qt cannot be imported.
    With ``--after-core``, the core's quick tests (run before with Qt blocked) are left out."""
    if config.getoption("--after-core"):
        ui = Path(__file__).parent / "ui"
        ran = [i for i in items if ui not in Path(i.path).parents
               and i.get_closest_marker("slow") is None and i.get_closest_marker("qt") is None]
        if ran:
            config.hook.pytest_deselected(items=ran)
            items[:] = [i for i in items if i not in set(ran)]
    if QSettings is None:
        skip = pytest.mark.skip(reason="draws with Qt, and PySide6 cannot be imported here")
        for item in items:
            if item.get_closest_marker("qt") is not None:
                item.add_marker(skip)


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


# ---- leaks: lrviz-* threads, child processes, QThreads and running QTimers ------------------------------

#: How long a test's threads and children get to finish after it (a run told to stop ends within a step).
THREAD_GRACE_S = 3.0
_STARTED_AT = "_lrviz_started_at"
_ROOT = str(Path(__file__).resolve().parents[1])


def _where(obj: object) -> str:
    """The creation stack recorded for ``obj`` (the test's own frames and lrviz's), or a note why not."""
    stack = getattr(obj, _STARTED_AT, None)
    if not stack:
        return "    (where it started was not recorded)"
    frames = [f for f in stack if f.filename.startswith(_ROOT) and not f.filename.endswith("conftest.py")
              and "site-packages" not in f.filename]
    return "".join(traceback.format_list(frames[-8:])).rstrip()


def _record_starts() -> None:
    """Record where every thread and child process is started (once, for the whole session)."""
    if getattr(threading.Thread.start, "_lrviz_records", False):
        return
    thread_start, popen_init = threading.Thread.start, subprocess.Popen.__init__
    from lrviz.live.forkserver import ForkedProcess

    forked_init = ForkedProcess.__init__

    def start(self, *args, **kwargs):  # noqa: ANN001, ANN202
        setattr(self, _STARTED_AT, traceback.extract_stack()[:-1])
        self._lrviz_owner = getattr(getattr(self, "_target", None), "__self__", None)
        return thread_start(self, *args, **kwargs)

    def init(self, *args, **kwargs):  # noqa: ANN001, ANN202
        setattr(self, _STARTED_AT, traceback.extract_stack()[:-1])
        popen_init(self, *args, **kwargs)
        _POPENS[self.pid] = self

    def fork_init(self, *args, **kwargs):  # noqa: ANN001, ANN202
        setattr(self, _STARTED_AT, traceback.extract_stack()[:-1])
        forked_init(self, *args, **kwargs)
        _FORKS.add(self)

    start._lrviz_records = True  # type: ignore[attr-defined]
    threading.Thread.start = start  # type: ignore[method-assign]
    subprocess.Popen.__init__ = init  # type: ignore[method-assign]
    ForkedProcess.__init__ = fork_init  # type: ignore[method-assign]


#: Popen objects by pid, to say where a leftover child was started.
_POPENS: weakref.WeakValueDictionary[int, subprocess.Popen] = weakref.WeakValueDictionary()
#: Workers forked by a fork server (their pid comes later), for the same.
_FORKS: weakref.WeakSet = weakref.WeakSet()


def _children_of(pid: int | str) -> set[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


def _live_children() -> set[int]:
    """This process's descendants that still run (zombies, ended but not yet reaped, do not count):
    its children, and theirs (a worker forked by the pool's fork server is the server's child)."""
    live: set[int] = set()
    todo = _children_of("self")
    while todo:
        pid = todo.pop()
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and pid not in live:
            live.add(pid)
            todo |= _children_of(pid)
    return live


def _started_at(pid: int) -> object:
    """The Popen, or the pool's forked worker, of ``pid`` (where it was started is recorded on it)."""
    found = _POPENS.get(pid)
    return found if found is not None else next((f for f in list(_FORKS) if f.pid == pid), None)


@pytest.fixture(scope="session")
def session_owned() -> list:
    """Callables naming what a session-scoped fixture keeps across tests (the app's warm worker and its
    fork server: their process ids and their WorkerProcess/ForkServer, whose reader threads live as long
    as they do): not a test's leak."""
    return []


@pytest.fixture(autouse=True)
def _no_leaks(monkeypatch: pytest.MonkeyPatch, session_owned: list):
    """Fail a test that leaves an ``lrviz-*`` thread, a child process, a QThread or a running QTimer of
    its own behind, saying where each was started: leftovers are what make suites crash or flake later,
    far from their cause (napari's ``_dangling_qthreads``)."""
    _record_starts()
    qthreads: list = []
    qtimers: list = []
    if QThread is not None and "PySide6.QtCore" in sys.modules:
        from PySide6.QtCore import QTimer

        for cls, seen in ((QThread, qthreads), (QTimer, qtimers)):
            def record(self, *args, _original=cls.start, _seen=seen, **kwargs):  # noqa: ANN001, ANN202
                try:
                    setattr(self, _STARTED_AT, traceback.extract_stack()[:-1])
                except AttributeError:
                    pass
                _seen.append(self)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, "start", record)
    threads_before = set(threading.enumerate())
    children_before = _live_children()
    yield

    if qtimers:  # widgets the test closed go now (pytest-qt asked deleteLater), and their timers with them
        from PySide6.QtCore import QCoreApplication, QEvent

        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)

    def leftovers() -> list[str]:
        owned: set = set()
        for names in session_owned:
            owned |= names()
        out = [f"thread {t.name!r}, started at:\n{_where(t)}" for t in threading.enumerate()
               if t.name.startswith("lrviz-") and t.is_alive() and t not in threads_before
               and getattr(t, "_lrviz_owner", None) not in owned]
        for pid in sorted(_live_children() - children_before - owned):
            out.append(f"child process {pid}, started at:\n{_where(_started_at(pid))}")
        for qt in qthreads:
            try:
                if qt.isRunning():
                    out.append(f"QThread {qt!r}, started at:\n{_where(qt)}")
            except RuntimeError:  # its C++ object is gone: not running
                pass
        for timer in qtimers:
            try:
                if timer.isActive():
                    parent = timer.parent()
                    out.append(f"running QTimer of {type(parent).__name__ if parent else 'no parent'}, "
                               f"started at:\n{_where(timer)}")
            except RuntimeError:  # deleted with its widget
                pass
        return out

    left = leftovers()
    deadline = time.monotonic() + THREAD_GRACE_S
    for t in threading.enumerate():  # wait on the threads themselves, bounded, rather than sleep
        if left and t.name.startswith("lrviz-") and t not in threads_before:
            t.join(max(0.0, deadline - time.monotonic()))
    while left and time.monotonic() < deadline:  # children and Qt objects have no join: poll briefly
        time.sleep(0.02)
        left = leftovers()
    left = leftovers()
    if left:
        for t in threading.enumerate():  # a run left training would draw from torch's global RNG under
            owner = getattr(t, "_lrviz_owner", None)  # the next tests of this process: stop it now
            if t.name == "lrviz-engine" and t not in threads_before and hasattr(owner, "stop"):
                owner.stop()
                t.join(THREAD_GRACE_S)
        pytest.fail("the test left these running:\n" + "\n".join(left), pytrace=False)
