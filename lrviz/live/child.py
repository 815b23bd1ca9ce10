"""The app's side of its training processes: start a worker, ask it things, watch it, stop it.

:class:`WorkerProcess` runs ``python -m lrviz worker`` (torch is imported there, never in the app)
and talks to it over a private pipe; with a :class:`~lrviz.live.forkserver.ForkServer` (the pool's,
on Linux) the worker is a fork of that server, which imported torch once for all of them.
:class:`ChildRun` is a :class:`~lrviz.live.run.RemoteRun` of a run trained by such a worker: it
attaches to the worker's endpoint, stops it cooperatively first, then with SIGTERM, then SIGKILL,
and when the process dies on its own (a segfault, the OOM killer) it shows the run as failed with
the signal and puts the store row right. Nothing here imports torch or Qt.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from lrviz.errors import LrvizError, ScriptError
from lrviz.states import Command, RunState, is_terminal

from .client import CommandRejected, NotLive
from .connection import ConnectionInfo
from .forkserver import UNKNOWN_EXIT, ForkedProcess, ForkServer, fork_unavailable, say_once
from .run import RemoteRun

log = logging.getLogger(__name__)

#: After a failed attach, how long to wait for the worker to exit (its run ended) before calling the
#: run unreachable.
ATTACH_EXIT_S = 3.0

#: A stop escalates: cooperative stop, then SIGTERM after this long, then SIGKILL after as long again.
STOP_GRACE_S = 2.0
#: A run that has answered the stop gets this much longer to save and exit.
EXIT_GRACE_S = 10.0
READY_TIMEOUT_S = 120.0


class WorkerError(LrvizError):
    """A worker could not do what it was asked (the script failed, or the worker died)."""

    def __init__(self, message: str, detail: str = "", path: str | None = None, line: int | None = None):
        super().__init__(message)
        self.detail = detail
        self.path = path
        self.line = line


def signal_name(code: int | None) -> str:
    """``SIGSEGV`` for a Popen return code of -11 (or 139 from a shell)."""
    if code is None:
        return ""
    num = -code if code < 0 else code - 128
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def describe_exit(code: int | None) -> str:
    """How a worker ended, in words."""
    if code is None:
        return "still running"
    if code == UNKNOWN_EXIT:
        return "ended (how is unknown: the fork server that started it had died)"
    if code < 0 or code > 128:
        name = signal_name(code)
        hint = {"SIGKILL": " (out of memory? the system's OOM killer sends SIGKILL)",
                "SIGSEGV": " (a crash in native code: a CUDA/extension bug, or out of memory)"}.get(name, "")
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


class WorkerProcess:
    """One ``python -m lrviz worker`` child (or a fork of ``server``, where it can be one) and its
    request pipe."""

    def __init__(self, *, log_dir: str | os.PathLike | None = None, python: str | None = None,
                 env: dict[str, str] | None = None, server: ForkServer | None = None):
        self.python = python or sys.executable
        self.env = env
        self.server = server
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"lrviz-worker-{os.getpid()}-{id(self):x}.log"
        self.proc: subprocess.Popen | ForkedProcess | None = None
        self.ready: Future = Future()
        self.info: dict[str, Any] = {}
        self.busy = False
        self.ended: dict[str, Any] | None = None
        #: The id of the run it trains, once recorded (sent before its first step).
        self.run_id: int | None = None
        self.exited = threading.Event()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ids = 0
        self._lines: deque[str] = deque(maxlen=200)

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            if self.server is not None:
                self.proc = self.server.fork(python=self.python, env=env, cwd=os.getcwd(), stderr=log_file.fileno())
            if self.proc is None:
                self.proc = subprocess.Popen(
                    [self.python, "-m", "lrviz", "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=log_file, env=env, start_new_session=True, text=True, bufsize=1)
        finally:
            log_file.close()
        threading.Thread(target=self._read, name="lrviz-worker-reader", daemon=True).start()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the worker's stderr (the script's prints and tracebacks)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Ask an idle worker to exit; a training one is left to its run."""
        if self.busy or not self.alive():
            return
        try:
            self._send({"op": "exit"})
        except OSError:
            pass

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker and everything it started (its own process group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if isinstance(self.proc, ForkedProcess):  # also before the fork is done: sent once it is
            self.proc.signal_group(sig)
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # ---- requests --------------------------------------------------------------------------------------
    def inspect(self, script: str | os.PathLike) -> Future:
        """A Future of the script's :class:`~lrviz.scriptinfo.ScriptInfo` (or of its WorkerError)."""
        from lrviz.scriptinfo import ScriptInfo

        out: Future = Future()
        _chain(self._request({"op": "inspect", "script": str(script)}), out, ScriptInfo.from_dict)
        return out

    def train(self, spec: dict[str, Any]) -> Future:
        """Start the run ``spec`` describes; a Future of the endpoint's ConnectionInfo."""
        self.busy = True
        return self._request({"op": "train", "spec": spec})

    def _request(self, msg: dict[str, Any]) -> Future:
        fut: Future = Future()
        with self._lock:
            self._ids += 1
            rid = self._ids
            self._pending[rid] = fut
        if self.exited.is_set():
            self._fail_pending()
            return fut
        try:
            self._send({**msg, "id": rid})
        except (OSError, ValueError):
            self._fail_pending()
        return fut

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._on_message(msg)
        self.proc.wait()
        self.exited.set()
        if not self.ready.done():
            self.ready.set_exception(self._died("while starting"))
        self._fail_pending()

    def _on_message(self, msg: dict[str, Any]) -> None:
        t = msg.get("t")
        if t == "ready":
            self.info = msg
            if not self.ready.done():
                self.ready.set_result(msg)
            return
        if t == "ended":
            self.ended = msg
            return
        if t == "opened":
            self.run_id = msg.get("run_id")
            return
        with self._lock:
            fut = self._pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if fut is None or fut.done():
            return
        if t == "inspected":
            if msg.get("ok"):
                fut.set_result(msg["experiment"])
            else:
                fut.set_exception(_error_of(msg))
        elif t == "serving":
            fut.set_result(ConnectionInfo.from_dict(msg["conn"]))
        elif t in ("failed", "error"):
            fut.set_exception(_error_of(msg))

    def _died(self, when: str) -> WorkerError:
        how = describe_exit(self.returncode)
        tail = self.log_tail()
        return WorkerError(f"the training process {how} {when}", tail)

    def _fail_pending(self) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(self._died("before answering"))


def _error_of(msg: dict[str, Any]) -> WorkerError:
    text = str(msg.get("error") or msg.get("message") or "the worker refused")
    if msg.get("type") == "ScriptError" and msg.get("path") is not None:
        err = ScriptError(text.split(": ", 1)[-1] if text.startswith(str(msg["path"])) else text,
                          msg["path"], msg.get("line"))
        text = str(err)
    return WorkerError(text, str(msg.get("detail") or ""), msg.get("path"), msg.get("line"))


class ChildRun(RemoteRun):
    """A run trained by a :class:`WorkerProcess`, followed live; ``start()`` sends it the spec.

    Commands given before the endpoint is up wait and go out once attached. ``done`` is set when
    the worker process has exited (and everything it sent was read); ``state`` is then the truth,
    also when the process died (failed, with the signal in ``error``).
    """

    def __init__(self, worker: WorkerProcess, spec: dict[str, Any], *, name: str = "app"):
        super().__init__(None, name=name)  # type: ignore[arg-type]
        self.worker = worker
        self.spec = spec
        self.store_path: str | None = spec.get("store")
        self.state = RunState.PREPARING
        self.name = str(spec.get("name") or Path(str(spec.get("script", ""))).stem)
        self.script_path = str(spec.get("script", ""))
        self.config = dict(spec.get("config") or {})
        self.attached = threading.Event()
        self._queued: list[tuple[str, dict[str, Any], Future]] = []
        self._qlock = threading.Lock()
        self._stop_asked_at: float | None = None
        self._terminated = False

    def start(self) -> ChildRun:
        fut = self.worker.train(self.spec)
        fut.add_done_callback(self._on_serving)
        threading.Thread(target=self._watch_process, name="lrviz-child-watch", daemon=True).start()
        return self

    # ---- commands -----------------------------------------------------------------------------------
    def command(self, kind: str, **data: Any) -> Future:
        if str(kind) == Command.STOP:
            self._escalate_later()
        with self._qlock:
            if not self.attached.is_set():
                if self.done.is_set():
                    fut: Future = Future()
                    fut.set_exception(NotLive(f"the run has ended ({self.state})"))
                    return fut
                fut = Future()
                self._queued.append((str(kind), data, fut))
                return fut
        return super().command(kind, **data)

    def kill(self) -> None:
        """End the worker now (SIGKILL)."""
        self.worker.signal(signal.SIGKILL)

    def _escalate_later(self) -> None:
        if self._stop_asked_at is not None:
            return
        self._stop_asked_at = time.monotonic()
        threading.Thread(target=self._escalate, name="lrviz-child-stop", daemon=True).start()

    def _escalate(self) -> None:
        """Cooperative stop first; SIGTERM if the run has not ended; then SIGKILL.

        A run that answered (its end arrived) gets longer to exit: it is saving, not hanging.
        """
        if self.worker.exited.wait(STOP_GRACE_S):
            return
        if self.client.close_reason == "end" and self.worker.exited.wait(EXIT_GRACE_S):
            return
        log.info("run %s did not stop within %.1f s: terminating its process", self.run_id, STOP_GRACE_S)
        self._terminated = True
        self.worker.signal(signal.SIGTERM)
        if self.worker.exited.wait(STOP_GRACE_S):
            return
        log.warning("run %s did not exit on SIGTERM: killing its process", self.run_id)
        self.worker.signal(signal.SIGKILL)

    # ---- attaching ------------------------------------------------------------------------------------
    def _on_serving(self, fut: Future) -> None:
        exc = fut.exception()
        if exc is not None:  # the script did not load, or the worker died: nothing to attach to
            self._fail(str(exc), getattr(exc, "detail", ""))
            return
        self.info = fut.result()
        self.client.info = self.info
        try:
            self.connect()
        except NotLive as err:  # the run may have ended already (refused at its start): its worker says why
            threading.Thread(target=self._attach_failed, args=(str(err),), name="lrviz-child-attach",
                             daemon=True).start()
            return
        with self._qlock:
            queued, self._queued = self._queued, []
            self.attached.set()
        for kind, data, waiting in queued:
            _chain(super().command(kind, **data), waiting)

    def _attach_failed(self, err: str) -> None:
        """No answer from the run's endpoint: a worker that exits now ended its run (its process watcher
        reports the run's own error); one that lives on cannot be attached to."""
        if not self.worker.exited.wait(ATTACH_EXIT_S):
            self._fail(f"cannot attach to the training process: {err}", self.worker.log_tail())

    def connect(self, timeout: float = 5.0) -> ChildRun:
        super().connect(timeout)
        if self.store_path is None:
            self.store_path = (self.describe or {}).get("store")
        return self

    def _watch(self) -> None:  # the connection ended; the process watcher decides when we are done
        self.client.closed.wait()
        if self.client.close_reason != "end":
            self.lost = self.client.close_reason
        self.changed.set()

    def _watch_process(self) -> None:
        self.worker.exited.wait()
        if self.attached.is_set():
            self.client.closed.wait(5.0)
        code = self.worker.returncode
        if self.run_id is None:
            self.run_id = self.worker.run_id
        ended = self.worker.ended or {}
        if not self.attached.is_set() and ended.get("error") and not is_terminal(self.state):
            # the run ended before we could attach (refused at its start): its own message
            self._end(RunState(ended.get("state") or RunState.FAILED), str(ended["error"]), str(ended.get("detail") or ""))
        if not is_terminal(self.state) or self.lost:
            if self._terminated or (code is not None and signal_name(code) == "SIGTERM"):
                self._end(RunState.STOPPED, "stopped: the training process did not answer and was terminated")
            elif code is not None and (code < 0 or code > 128):
                self._end(RunState.FAILED, f"the training process {describe_exit(code)}",
                          self.worker.log_tail())
            elif not is_terminal(self.state):
                self._end(RunState.FAILED, f"the training process {describe_exit(code)} unexpectedly",
                          self.worker.log_tail())
        with self._qlock:
            queued, self._queued = self._queued, []
        for _, _, waiting in queued:
            if not waiting.done():
                waiting.set_exception(NotLive(f"the run ended ({self.state}) before it started"))
        self.done.set()
        self.changed.set()

    def _fail(self, message: str, detail: str = "") -> None:
        self.state = RunState.FAILED
        self.error = message
        self.error_detail = detail

    def _end(self, state: RunState, message: str, detail: str = "") -> None:
        self.state = state
        self.error = message if state != RunState.STOPPED else None
        if detail:
            self.error_detail = detail
        self.stop_message = message
        if self.run_id is not None and self.store_path:
            fix_store_row(self.store_path, self.run_id, state, message)


def fix_store_row(store_path: str, run_id: int, state: str, message: str) -> None:
    """Put a run's row right after its process died without saying so (never raises)."""
    try:
        from lrviz.store.runs import RunStore

        store = RunStore(store_path)
        try:
            info = store.get_run(run_id)
            if not is_terminal(info.status) or info.status == "interrupted":
                store.set_status(run_id, str(state), error=message)
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - the app carries on; the store marks it interrupted later
        log.exception("could not record how run %s ended", run_id)


def _chain(src: Future, dst: Future, convert: Any = None) -> None:
    def done(f: Future) -> None:
        if dst.done():
            return
        exc = f.exception()
        if exc is not None:
            dst.set_exception(exc)
            return
        try:
            dst.set_result(convert(f.result()) if convert is not None else f.result())
        except Exception as err:  # noqa: BLE001 - a malformed answer is the caller's error to show
            dst.set_exception(WorkerError(f"the training process answered something unexpected: {err}"))

    src.add_done_callback(done)


class WorkerPool:
    """Keeps one warm worker ready (torch already imported), so Start and Open take no import time.

    ``inspect`` asks the spare (it stays the spare); ``take`` hands the spare over for a run and
    starts the next one in the background. ``close`` ends the spare (runs keep their workers).

    With ``fork`` (on Linux; the default unless ``LRVIZ_WORKERS=spawn``), a fork server started with
    the first worker imports torch once and every worker is a fork of it (~1.5 s of CPU less per run); where a worker cannot be a fork (another
    platform, an env that differs at start-up, the server gone) it is spawned, and the log says why.
    A server that died after serving is started again with the next worker.
    """

    def __init__(self, *, log_dir: str | os.PathLike | None = None, python: str | None = None,
                 env: dict[str, str] | None = None, fork: bool | None = None):
        self.log_dir = log_dir
        self.python = python
        self.env = env
        #: ``LRVIZ_WORKERS=spawn`` (in the app's environment) spawns every worker: no fork server.
        self.fork = os.environ.get("LRVIZ_WORKERS", "fork") != "spawn" if fork is None else fork
        self.server: ForkServer | None = None
        self._spare: WorkerProcess | None = None
        self._lock = threading.Lock()
        self._server_lock = threading.Lock()
        self.closed = False

    def _new(self) -> WorkerProcess:
        return WorkerProcess(log_dir=self.log_dir, python=self.python, env=self.env,
                             server=self._forkserver()).start()

    def _forkserver(self) -> ForkServer | None:
        """The running fork server (started now if there is none); None where workers are spawned."""
        if not self.fork or self.closed:
            return None
        with self._server_lock:
            s = self.server
            if s is not None and s.dead.is_set():
                if not s.served:  # it never got as far as serving: it cannot (its log says why)
                    say_once(f"spawning workers: the fork server could not start (see {s.log_path})")
                    self.fork = False
                    return None
                log.info("the fork server (pid %s) has exited: starting another", s.pid)
                s = None
            if s is None:
                why = fork_unavailable()
                if why is not None:
                    say_once(f"spawning workers: {why}")
                    self.fork = False
                    return None
                log_path = Path(self.log_dir or tempfile.gettempdir()) / f"lrviz-forkserver-{os.getpid()}-{id(self):x}.log"
                s = self.server = ForkServer(python=self.python, env=self.env, log_path=log_path).start()
            return s

    def spare(self) -> WorkerProcess:
        """The warm worker (started now if there is none, or the last one died)."""
        with self._lock:
            w = self._spare
            if w is None or w.exited.is_set() or w.busy:
                w = self._spare = self._new()
            return w

    def warm(self) -> None:
        """Start the spare now (e.g. at app start, before anyone asks)."""
        self.spare()

    def inspect(self, script: str | os.PathLike) -> Future:
        return self.spare().inspect(script)

    def take(self) -> WorkerProcess:
        """A worker for one run; a new spare starts warming at once."""
        with self._lock:
            w = self._spare
            self._spare = None
        if w is None or w.exited.is_set():
            w = self._new()
        if not self.closed:
            threading.Thread(target=self.warm, name="lrviz-worker-warm", daemon=True).start()
        return w

    def start_run(self, spec: dict[str, Any], *, name: str = "app") -> ChildRun:
        """Train ``spec`` in a worker of its own, followed live."""
        return ChildRun(self.take(), spec, name=name).start()

    def close(self) -> None:
        self.closed = True
        with self._lock:
            w, self._spare = self._spare, None
        if w is not None:
            w.close()
        with self._server_lock:
            if self.server is not None:
                self.server.close()


__all__ = ["ChildRun", "CommandRejected", "WorkerError", "WorkerPool", "WorkerProcess", "describe_exit",
           "fix_store_row"]
