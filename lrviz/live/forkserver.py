"""A fork server: one long-lived process imports torch once; each of the app's workers is a fork of it.

``python -m lrviz forkserver FD`` imports torch and the worker's modules, then waits on ``FD`` (its end
of a Unix ``SOCK_SEQPACKET`` socket pair: private, no path to find). It runs no torch op and starts no
thread (a fork copies one thread only, and CUDA/OpenMP state does not survive a fork), so each fork
starts as clean as a fresh ``python -m lrviz worker`` but without the ~1.5 s of CPU of importing torch.

The app (:class:`ForkServer`) sends ``{"op": "fork", "id", "env", "cwd", "argv"}`` with the worker's
stdin, stdout and stderr as ``SCM_RIGHTS`` file descriptors (``socket.send_fds``, as CPython's
``multiprocessing.forkserver`` does). The server forks; the child starts a session of its own, takes
the three descriptors as fds 0-2, applies the env and the working directory, reseeds numpy's global
generator (Python's ``random`` reseeds itself after a fork; torch's default generator is untouched in
the server, so it starts from torch's fixed default seed, as in a fresh process), runs the worker's
main and ``os._exit``s with its status. The server answers ``{"t": "forked", "id", "pid"}``, reaps its
children and reports each one's status, ``{"t": "exit", "pid", "code"}`` (negative: the signal), since
the app is not their parent and cannot wait for them. When the app goes away its end of the socket
closes and the server exits; the workers it forked keep running (their runs are theirs).

The app side (:class:`ForkedProcess`) looks like a ``subprocess.Popen``: ``pid``, ``poll()``,
``wait(timeout)``, ``send_signal``/``terminate``/``kill``, ``returncode``, ``stdin``/``stdout``. A fork
asked for while the server still imports torch waits in the socket; if the server dies first, the
worker is spawned the plain way on the same pipes. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from typing import IO, Any

from .protocol import close_socket

log = logging.getLogger(__name__)

#: Environment variables read when the interpreter or torch (and its OpenMP/MKL/CUDA) start: a fork
#: inherits the server's start-up, so a worker whose env differs in one of these is spawned instead.
STARTUP_PREFIXES = ("PYTHON", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "LD_", "MALLOC_", "GLIBC_",
                    "CUDA_", "CUBLAS", "CUDNN_", "NCCL_", "NVIDIA_", "TORCH", "PYTORCH_", "HIP_", "ROCM_",
                    "HSA_", "LC_", "LANG", "TZ", "VIRTUAL_ENV")
#: What the server imports before it serves (the worker's imports, so a fork imports nothing heavy).
#: ``torch._dynamo`` is torch's: the first optimizer a process builds imports it (``add_param_group`` is
#: wrapped in ``torch._disable_dynamo``), ~1.3 s of CPU with sympy; it starts no thread. With it and
#: ``torch.distributed`` here, a forked worker's first 50 steps of a tiny script take ~0.05 s of CPU
#: instead of ~1.3 s.
PRELOAD = ("torch", "numpy", "torch._dynamo", "torch.distributed", "lrviz.live.worker", "lrviz.live.serve",
           "lrviz.engine", "lrviz.experiment", "lrviz.devices", "lrviz.config", "lrviz.store.runs",
           "lrviz.interventions", "lrviz.distributed", "lrviz.guard", "lrviz.lab.diagnostics",
           "lrviz.lab.generalization")
_MAX_MSG = 1 << 20
#: The status reported for a fork whose server died before reporting it (its real status is lost):
#: neither an exit status nor a signal.
UNKNOWN_EXIT = -1000

_said: set[str] = set()
_said_lock = threading.Lock()


def say_once(message: str, said: set[str] | None = None) -> None:
    """Log why a worker is spawned rather than forked, once per reason (per ``said``: by default, once
    in this process)."""
    said = _said if said is None else said
    with _said_lock:
        if message in said:
            return
        said.add(message)
    log.info(message)


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that take effect at interpreter/torch start-up."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES)}


def fork_unavailable() -> str | None:
    """Why this platform cannot fork workers (None: it can)."""
    if not sys.platform.startswith("linux"):  # macOS forks badly once torch is imported; Windows has no fork
        return f"forking workers is only done on Linux, not {sys.platform}"
    if not hasattr(socket, "send_fds") or not hasattr(socket, "SOCK_SEQPACKET"):
        return "this Python cannot pass file descriptors over a socket"
    return None


# ---- the app's side ----------------------------------------------------------------------------------------
class ForkedProcess:
    """A worker forked by the server, seen like a ``subprocess.Popen`` (also when it had to be spawned)."""

    def __init__(self, server: ForkServer, fds: tuple[int, int, int], stdin: IO[str], stdout: IO[str],
                 python: str, env: dict[str, str], cwd: str):
        self.server = server
        self.stdin = stdin
        self.stdout = stdout
        self.pid: int | None = None
        self.returncode: int | None = None
        self.forked = False
        self.popen: subprocess.Popen | None = None
        self._child_fds = fds  # the child's ends, kept until it has them (for a spawn if the server dies)
        self._spawn_args = (python, env, cwd)
        self._started = threading.Event()
        self._exited = threading.Event()
        self._signals: list[int] = []
        self._lock = threading.Lock()

    # ---- Popen's interface -----------------------------------------------------------------------------
    def poll(self) -> int | None:
        if self.popen is not None:
            self.returncode = self.popen.poll()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._started.wait(timeout):
            raise subprocess.TimeoutExpired("lrviz worker", timeout)  # type: ignore[arg-type]
        if self.popen is not None:
            self.returncode = self.popen.wait(timeout)
            return self.returncode
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired("lrviz worker", timeout)  # type: ignore[arg-type]
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self._signal(sig, group=False)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        """Signal the worker's process group (its session: it and everything it started); a signal sent
        before the fork has happened is delivered as soon as it has."""
        self._signal(sig, group=True)

    def _signal(self, sig: int, *, group: bool) -> None:
        with self._lock:
            if self.pid is None:
                self._signals.append(-sig if group else sig)
                return
        if self.poll() is not None:
            return
        try:
            (os.killpg if group else os.kill)(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # ---- what the server says --------------------------------------------------------------------------
    def _on_forked(self, pid: int) -> None:
        self.forked = True
        self._got_pid(pid)

    def _on_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def _spawn(self, why: str) -> None:
        """The server cannot fork it: start it the plain way, on the same pipes."""
        say_once(f"spawning a worker: {why}", self.server.said)
        python, env, cwd = self._spawn_args
        try:
            self.popen = subprocess.Popen([python, "-m", "lrviz", "worker"], stdin=self._child_fds[0],
                                          stdout=self._child_fds[1], stderr=self._child_fds[2], env=env,
                                          cwd=cwd, start_new_session=True)
        except OSError as err:
            log.error("could not start a worker: %s", err)
            self._close_child_fds()
            self.returncode = 1
            self._exited.set()
            self._started.set()
            return
        self._got_pid(self.popen.pid)

    def _got_pid(self, pid: int) -> None:
        self._close_child_fds()
        with self._lock:
            self.pid = pid
            signals, self._signals = self._signals, []
        self._started.set()
        for s in signals:
            self._signal(abs(s), group=s < 0)

    def _close_child_fds(self) -> None:
        fds, self._child_fds = self._child_fds, ()  # type: ignore[assignment]
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class ForkServer:
    """The app's handle on one fork server: start it, ask it for workers, hear how they end."""

    def __init__(self, *, python: str | None = None, env: dict[str, str] | None = None,
                 log_path: str | os.PathLike | None = None):
        self.python = python or sys.executable
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        #: Whether it got as far as serving (a server that dies before is not started again).
        self.served = False
        self.dead = threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._ids = 0
        self._pending: dict[int, ForkedProcess] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._closing = False
        #: What this server's log lines have said already (each reason once).
        self.said: set[str] = set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> ForkServer:
        """Start the server in the background (it imports torch there; this returns at once)."""
        if self.log_path:
            os.makedirs(os.path.dirname(os.fspath(self.log_path)) or ".", exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen([self.python, "-m", "lrviz", "forkserver", str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=self.env,
                                         start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if err is not subprocess.DEVNULL:
                err.close()
        self._sock = ours
        threading.Thread(target=self._read, name="lrviz-forkserver", daemon=True).start()
        return self

    def refuses(self, python: str, env: dict[str, str]) -> str | None:
        """Why a worker with this python and env cannot be a fork of this server (None: it can)."""
        if self.dead.is_set():
            return "the fork server has exited"
        if os.path.abspath(python) != os.path.abspath(self.python):  # a venv's python links to another
            return f"its python ({python}) is not the fork server's ({self.python})"
        mine, theirs = startup_env(self.env), startup_env(env)
        if mine != theirs:
            names = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            return f"its environment differs from the fork server's in {', '.join(names)}"
        return None

    def fork(self, *, python: str, env: dict[str, str], cwd: str, stderr: int) -> ForkedProcess | None:
        """A worker forked from the server, reading and writing the pipes returned on the object, its
        stderr going to ``stderr`` (a file descriptor, duplicated); None (said in the log once) where it
        cannot be a fork: spawn it instead."""
        why = self.refuses(python, env)
        if why is not None:
            say_once(f"spawning workers, not forking them: {why}", self.said)
            return None
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        fds = (in_r, out_w, os.dup(stderr))
        proc = ForkedProcess(self, fds, open(in_w, "w", buffering=1),  # noqa: SIM115 - the proc's own
                             open(out_r), python, env, cwd)  # noqa: SIM115
        msg = {"op": "fork", "env": env, "cwd": cwd}
        with self._lock:
            self._ids += 1
            rid = self._ids
            self._pending[rid] = proc
            try:
                if self._sock is None:
                    raise OSError("it has been closed")
                socket.send_fds(self._sock, [json.dumps({**msg, "id": rid}).encode()], list(fds))
            except OSError as err:
                self._pending.pop(rid, None)
                proc._spawn(f"the fork server did not take the request ({err})")
        return proc

    def close(self) -> None:
        """Let the server go (it exits when its socket closes); kept open while forks it started still
        run, so their exit statuses still reach the app."""
        with self._lock:
            self._closing = True
            busy = bool(self._pending or self._children)
        if not busy:
            self._shut()

    def _shut(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            close_socket(sock)

    def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(_MAX_MSG)
            except OSError:
                data = b""
            if not data:
                break
            try:
                msg = json.loads(data)
            except ValueError:
                continue
            self._on_message(msg)
        self.dead.set()
        self.ready.set()
        if self.proc is not None:
            self.proc.wait()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            orphans, self._children = list(self._children.values()), {}
        for proc in pending:  # asked for, never forked: spawn them on their pipes
            proc._spawn(f"the fork server exited with status {self.proc.returncode if self.proc else '?'}")
        if orphans:
            _await_orphans(orphans)
        self._shut()

    def _on_message(self, msg: dict[str, Any]) -> None:
        t = msg.get("t")
        if t == "ready":
            self.served = True
            self.ready.set()
            return
        done = False
        with self._lock:
            if t == "forked":
                proc = self._pending.pop(msg["id"], None)
                if proc is not None:
                    self._children[msg["pid"]] = proc
            elif t == "refused":
                proc = self._pending.pop(msg["id"], None)
            elif t == "exit":
                proc = self._children.pop(msg["pid"], None)
            else:
                return
            done = self._closing and not self._pending and not self._children
        if proc is not None:
            if t == "forked":
                proc._on_forked(msg["pid"])
            elif t == "refused":
                proc._spawn(f"the fork server could not fork: {msg.get('error')}")
            else:
                proc._on_exit(int(msg["code"]))
        if done:
            self._shut()


def _await_orphans(orphans: list[ForkedProcess]) -> None:
    """The server died while these forks ran: nobody can tell their exit status now; say when they end."""
    log.warning("the fork server died while %d worker(s) ran: their exit status will be unknown", len(orphans))
    fds: dict[int, ForkedProcess] = {}
    for proc in orphans:
        try:
            fds[os.pidfd_open(proc.pid)] = proc  # type: ignore[arg-type]
        except OSError:  # already gone
            proc._on_exit(UNKNOWN_EXIT)
    while fds:
        ready, _, _ = select.select(list(fds), [], [])
        for fd in ready:
            os.close(fd)
            fds.pop(fd)._on_exit(UNKNOWN_EXIT)


# ---- the server ---------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    """``python -m lrviz forkserver FD``: import torch once, then fork a worker per request on FD."""
    sock = socket.socket(fileno=int(argv[0]))
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:  # an optional one: the worker imports what it needs
            pass
    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)
    signal.set_wakeup_fd(sig_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select through sig_w
    _send(sock, {"t": "ready", "pid": os.getpid()})
    while True:
        try:
            ready, _, _ = select.select([sock, sig_r], [], [])
        except InterruptedError:
            continue
        if sig_r in ready:
            while True:
                try:
                    if not os.read(sig_r, 512):
                        break
                except BlockingIOError:
                    break
            _reap(sock)
        if sock in ready:
            try:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MSG, 3)
            except OSError:
                data, fds = b"", []
            if not data:  # the app has gone: so do we (the workers keep running)
                return 0
            req: dict[str, Any] = {}
            try:
                req = json.loads(data)
                if req.get("op") != "fork" or len(fds) != 3:
                    raise ValueError(f"a bad request: {req.get('op')!r} with {len(fds)} descriptors")
                pid = os.fork()
            except (OSError, ValueError) as err:
                for fd in fds:
                    os.close(fd)
                _send(sock, {"t": "refused", "id": req.get("id"), "error": str(err)})
                continue
            if pid == 0:
                _child(req, fds, sock, (sig_r, sig_w))  # never returns
            for fd in fds:
                os.close(fd)
            _send(sock, {"t": "forked", "id": req["id"], "pid": pid})
            _reap(sock)


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(msg).encode())
    except OSError:  # the app has gone; the next read says so
        pass


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"t": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def _child(req: dict[str, Any], fds: list[int], sock: socket.socket, own: tuple[int, int]) -> None:
    """In the fork: become the worker ``python -m lrviz worker`` would have been, then exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in own:
            os.close(fd)
        os.setsid()
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(req.get("cwd") or "/")
        os.environ.clear()
        os.environ.update(req.get("env") or {})
        if "numpy" in sys.modules:  # a fresh process seeds its global generator from the OS: so does a fork
            sys.modules["numpy"].random.seed()
        sys.argv = [sys.argv[0], "worker"]
        from lrviz.live.worker import main as worker_main

        code = worker_main([])
        for t in threading.enumerate():  # what interpreter exit does: wait for the non-daemon threads
            if t is not threading.current_thread() and not t.daemon:
                t.join()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the worker's stderr, as an uncaught error would be
        traceback.print_exc()
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


__all__ = ["ForkServer", "ForkedProcess", "STARTUP_PREFIXES", "UNKNOWN_EXIT", "fork_unavailable", "main", "startup_env"]
