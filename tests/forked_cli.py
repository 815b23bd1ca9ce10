"""``python -m lrviz ARGV`` as a child process forked from the test's process, which has imported torch
and lrviz already: the command runs in a process of its own (its own folder, environment, stdout and
stderr on file descriptors 1 and 2, exit status from the kernel), without paying a new interpreter's
start and torch's import (~1.5-3 s of CPU a child on this suite's machines).

The child is set back to what a fresh ``python -m lrviz`` meets before it runs the command: no logging
handler (pytest's are dropped, so the command's own logging goes to stderr), Python's default warning
filters and signal handlers, ``sys.argv``, and one torch thread (``OMP_NUM_THREADS=1``, as the suite
runs). It runs ``lrviz/__main__.py`` itself, and ends as the interpreter does: an exception that escapes
is printed with its traceback (status 1), ``SystemExit`` gives the status, non-daemon threads are joined
and the ``atexit`` functions the command registered run, then the process exits.

For what needs a process started from nothing (a signal sent from outside, Qt's import, a module
imported at start-up), the tests start ``python -m lrviz`` itself (tests/test_cli.py has one of each).
"""

from __future__ import annotations

import atexit
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

#: The warning filters of a fresh Python 3 interpreter without -W options (the `warnings` docs).
_DEFAULT_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                    ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                    ("ignore", ResourceWarning, None)]


def _as_new(argv: list[str], cwd: Path | None, env: dict[str, str] | None, out: int, err: int) -> int:
    """In the child: set the process up as ``python -m lrviz ARGV`` would find it, run it; its status."""
    atexit._clear()  # pytest's exit functions are the parent's (its lock files): never run them here
    os.dup2(out, 1)
    os.dup2(err, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    warnings.resetwarnings()
    for action, category, module in reversed(_DEFAULT_FILTERS):
        warnings.filterwarnings(action, category=category, module=module or "")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    sys.argv = ["lrviz", *argv]
    try:
        runpy.run_module("lrviz", run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001  (what the interpreter would print, then exit 1)
        traceback.print_exc()
        status = 1
    threading._shutdown()  # type: ignore[attr-defined]  (the interpreter joins non-daemon threads at exit)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    return status


def lrviz_forked(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lrviz ARGV`` in a forked child (see the module's text); its status, stdout and stderr.
    ``timeout`` ends a hung child (killed) and fails the test."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                status = _as_new(argv, cwd, env, out.fileno(), err.fileno())
            except BaseException:  # noqa: BLE001  (setting the child up failed: say why, on its stderr)
                os.write(err.fileno(), traceback.format_exc().encode())
            finally:
                os._exit(status)
        status = _wait(pid, timeout)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["lrviz", *argv], status, out.read().decode(), err.read().decode())


def _wait(pid: int, timeout: float) -> int:
    """The child's exit status as a shell reports it (128 + N for a signal); kill it after ``timeout``."""
    done = threading.Event()
    killer = threading.Timer(timeout, lambda: done.is_set() or os.kill(pid, signal.SIGKILL))
    killer.daemon = True
    killer.start()
    try:
        _, code = os.waitpid(pid, 0)
    finally:
        done.set()
        killer.cancel()
    if os.WIFSIGNALED(code):
        sig = os.WTERMSIG(code)
        if sig == signal.SIGKILL:
            raise AssertionError(f"lrviz (forked) was killed: it ran past {timeout:.0f} s or was killed outside")
        return 128 + sig
    return os.WEXITSTATUS(code)
