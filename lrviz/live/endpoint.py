"""The live endpoint: a training process serves its run to any number of clients.

One thread accepts connections; each client gets one thread that authenticates it, answers its
commands and streams what the run produces (step columns in binary chunks, events, validation,
state, lab data) from the step it asked for. The training loop never waits on a client: the
endpoint reads the run's append-only records, ~30 times a second, and hands commands to the run's
own queue. A client that stops reading is dropped; a wrong token is refused, logged, and the run
carries on.

A local client (Unix socket) that asks for it reads the step rows itself from a shared-memory ring
(:mod:`lrviz.live.ring`) the training thread copies each published block into: its thread here
then sends the history before the ring's first row, and after that only what else changes, 5 times
a second (acks at once), so the rows never pass through this process's GIL.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from lrviz.errors import ConfigError, LrvizError
from lrviz.records import STEP_COLUMNS, Event, ValPoint
from lrviz.states import parse_command

from . import ring as ring_mod
from .connection import (
    ConnectionInfo,
    parse_listen,
    remove_quietly,
    socket_path,
    write_connection,
)
from .protocol import (
    MOVING,
    PROTOCOL_VERSION,
    REFUSED,
    AuthenticationError,
    FrameBatch,
    ProtocolError,
    close_socket,
    jsonable,
    new_token,
    pack_columns,
    recv_frame,
    send_frame,
    server_handshake,
)
from .ring import RingWriter, ring_path

log = logging.getLogger(__name__)

#: How often each client's thread looks for new records (seconds): as often as the app draws (30
#: frames a second), so a finished step is on screen within ~0.1 s; more often would cost the run
#: (each tick takes the GIL from its training thread) and show nothing sooner.
TICK_S = 1 / 30
#: How often the thread of a client that reads the rows from the ring looks for the rest (events,
#: validation, lab data, state): a change shows within this; acks go out at once.
RING_TICK_S = 0.2
#: An ack waits at most this long for the rows before its step (the run publishes them in blocks of
#: up to 0.1 s), checking this often.
ACK_HOLD_S = 0.25
ACK_POLL_S = 0.005
#: A state message goes out at least this often, even when nothing changed (the client's heartbeat).
HEARTBEAT_S = 1.0
#: At most this many rows per steps message.
CHUNK_ROWS = 1 << 16
#: A client that does not take a message within this time is dropped.
SEND_TIMEOUT_S = 10.0


class LiveSource(Protocol):
    """What the endpoint serves: a run's records, its state, and a way to submit commands.

    ``buffer``, ``events`` and ``validation`` are read-only to the endpoint and append-only.
    """

    done: threading.Event

    def describe(self) -> dict[str, Any]: ...
    def snapshot(self) -> dict[str, Any]: ...
    def records(self) -> tuple[Any, list[Event], list[ValPoint]]: ...
    def lab_updates(self, cursor: dict[str, Any]) -> list[dict[str, Any]]: ...
    def submit(self, kind: str, data: dict[str, Any]) -> Future: ...


def event_dict(e: Event) -> dict[str, Any]:
    return {"step": int(e.step), "kind": str(e.kind), "data": jsonable(e.data), "time": float(e.time)}


def val_dict(p: ValPoint) -> dict[str, Any]:
    return jsonable({"step": p.step, "epoch": p.epoch, "loss": p.loss, "accuracy": p.accuracy, "time": p.time})


class _Client:
    """One attached client: its socket, what it has been sent, and acks waiting to go out."""

    def __init__(self, cid: int, sock: socket.socket, peer: str):
        self.id = cid
        self.sock = sock
        self.peer = peer
        self.name = ""
        self.subscribed = False
        self.rows = 0
        self.n_events = 0
        self.n_val = 0
        self.lab: dict[str, Any] = {}
        self.state: dict[str, Any] | None = None
        self.state_at = 0.0
        self.outbox: deque[dict[str, Any]] = deque()
        self.closed = False
        self.held_since: float | None = None  # since when the first ack in the outbox waits for its rows
        self.ring = False  # it asked for the ring
        self.on_ring = False  # it was told the ring's path: no rows go out on the socket any more
        self.wake_r, self.wake_w = os.pipe()  # _broadcast wakes the client's loop (an ack goes out at once)
        os.set_blocking(self.wake_w, False)

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (the client left)
            pass

    def close_pipe(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class LiveEndpoint:
    """Serves ``source`` on a Unix socket (default) or on ``listen`` (``HOST:PORT``, TCP).

    ``start()`` listens and returns the :class:`ConnectionInfo`; ``register(path)`` writes it as a
    connection file (user-only); ``close()`` sends every client the end of the run and removes the
    file and the socket.
    """

    def __init__(self, source: LiveSource, *, listen: str | None = None, folder: Path | None = None,
                 token: str | None = None, tick: float = TICK_S):
        self.source = source
        self.listen = listen
        self.folder = folder
        self.token = token or new_token()
        self.tick = tick
        self.info: ConnectionInfo | None = None
        self.connection_file: Path | None = None
        self.refused: list[str] = []
        self._sock: socket.socket | None = None
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []
        self._row: Any = None  # (store, run_id) whose row names this endpoint
        self._ring_path: Path | None = None  # where the ring goes (Unix transport only)
        self._ring: RingWriter | None = None
        self._ring_buffer: Any = None
        self._ring_lock = threading.Lock()

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> ConnectionInfo:
        """Listen; return where (ConfigError when the address cannot be used)."""
        if self.listen is None and hasattr(socket, "AF_UNIX"):
            path = socket_path(self.folder)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
                os.chmod(path, 0o600)
            except OSError as exc:
                sock.close()
                raise ConfigError(f"cannot open the live endpoint at {path}: {exc.strerror or exc}") from None
            info = ConnectionInfo("unix", str(path), self.token)
            self._ring_path = ring_path(path.parent)
            info.ring = str(self._ring_path)  # in the connection file: removed with it when the run died
        else:
            host, port = parse_listen(self.listen or "127.0.0.1:0")
            try:
                sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            except OSError as exc:
                raise ConfigError(f"--listen {self.listen}: cannot listen there ({exc.strerror or exc})") from None
            info = ConnectionInfo("tcp", host, self.token, port=sock.getsockname()[1])
        sock.listen(8)
        sock.settimeout(0.2)
        self._sock = sock
        self.info = info
        t = threading.Thread(target=self._accept_loop, name="lrviz-live-accept", daemon=True)
        self._threads.append(t)
        t.start()
        return info

    def register(self, path: Path, run_id: int | None = None, store: str | None = None,
                 row: Any = None) -> None:
        """Write the connection file at ``path`` (user-only), naming the run; with ``row`` (a RunStore),
        also note on the run's row where it is served (never the token)."""
        assert self.info is not None
        if run_id is not None:
            self.info.run_id = run_id
        if store is not None:
            self.info.store = store
        write_connection(path, self.info)
        self.connection_file = path
        if row is not None and run_id is not None:
            try:
                row.set_endpoint(run_id, self.info)
                self._row = (row, run_id)
            except Exception as exc:  # noqa: BLE001 - the file is what clients use; the row is a courtesy
                log.warning("could not note the endpoint on run %s: %s", run_id, exc)

    @property
    def clients(self) -> int:
        with self._lock:
            return sum(1 for c in self._clients if not c.closed)

    def close(self, linger: float = 2.0) -> None:
        """Send the rest and the end to every client (waiting up to ``linger`` s), then shut down."""
        remove_quietly(self.connection_file)
        if self._row is not None:
            store, run_id = self._row
            self._row = None
            try:
                store.set_endpoint(run_id, None)
            except Exception as exc:  # noqa: BLE001 - a closed store: the stale-file check covers it
                log.debug("could not clear the endpoint of run %s: %s", run_id, exc)
        self._closing.set()
        with self._lock:
            for c in self._clients:
                c.wake()
        deadline = time.monotonic() + linger
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            close_socket(c.sock)
        if self._sock is not None:
            close_socket(self._sock)
            self._sock = None
        if self.info is not None and self.info.transport == "unix":
            remove_quietly(self.info.address)
        with self._ring_lock:
            ring, buf = self._ring, self._ring_buffer
            self._ring = self._ring_buffer = None
            self._ring_path = None
        if ring is not None:
            if getattr(buf, "mirror", None) is ring:
                buf.mirror = None
            ring.close()  # waits for a copy in progress; clients keep their mapping
        if self.folder is not None:
            try:
                self.folder.rmdir()  # only when no other run uses it
            except OSError:
                pass

    # ---- accepting --------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        sock = self._sock
        while not self._closing.is_set() and sock is not None:
            try:
                conn, addr = sock.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                break
            peer = _peer_name(addr)
            cid = next(self._ids)
            t = threading.Thread(target=self._serve, args=(conn, peer, cid), name=f"lrviz-live-client-{cid}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, peer: str, cid: int) -> None:
        try:
            server_handshake(sock, self.token)
        except (AuthenticationError, OSError, ProtocolError) as exc:
            msg = f"refused a connection from {peer}: {exc}"
            self.refused.append(msg)
            log.warning("%s", msg)
            try:
                sock.sendall(REFUSED)
            except OSError:
                pass
            close_socket(sock)
            return
        client = _Client(cid, sock, peer)
        with self._lock:
            self._clients.append(client)
        try:
            sock.settimeout(SEND_TIMEOUT_S)
            self._client_loop(client)
        except (OSError, ProtocolError) as exc:
            if not client.closed:
                log.debug("client %s (%s) left: %s", cid, peer, exc)
        except Exception:  # a fault of ours: this client is dropped, the run and the others carry on
            log.exception("live endpoint: serving client %s (%s) failed", cid, peer)
        finally:
            client.closed = True
            close_socket(sock)
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close_pipe()

    def _client_loop(self, c: _Client) -> None:
        src = self.source
        out = FrameBatch(c.sock)  # what one tick sends goes out in one write
        while True:
            wait = ACK_POLL_S if c.outbox else RING_TICK_S if c.on_ring else self.tick
            ready, _, _ = select.select([c.sock, c.wake_r], [], [], wait)
            if c.wake_r in ready:
                os.read(c.wake_r, 4096)
            if c.sock in ready:
                header, payload = recv_frame(c.sock)
                if not self._handle(c, header, payload):
                    return
            if c.subscribed:  # records first: an ack arrives after everything made before it
                self._push(c, out)
            while c.outbox and self._may_send(c, c.outbox[0]):
                out.add(c.outbox.popleft())
            ended = src.done.is_set()
            if (ended or self._closing.is_set()) and not c.outbox:
                if c.subscribed:
                    self._push(c, out)
                out.add({"t": "end", **jsonable(src.snapshot())})
                out.flush()
                c.closed = True
                return
            out.flush()

    # ---- messages in -----------------------------------------------------------------------------
    def _handle(self, c: _Client, h: dict[str, Any], payload: bytes) -> bool:
        t = h["t"]
        if t == "hello":
            c.name = str(h.get("client") or "")[:80]
            c.subscribed = bool(h.get("subscribe", True))
            c.rows = max(0, int(h.get("since_row") or 0))
            c.n_events = max(0, int(h.get("since_event") or 0))
            c.n_val = max(0, int(h.get("since_val") or 0))
            c.ring = bool(h.get("ring")) and self._ring_path is not None and c.subscribed
            send_frame(c.sock, {"t": "welcome", "version": PROTOCOL_VERSION, "client_id": c.id,
                                "run": jsonable(self.source.describe()), "state": jsonable(self.source.snapshot())})
            return True
        if t == "cmd":
            self._command(c, h)
            return True
        if t == "rows":  # a ring client was lapped: these rows from the buffer
            self._send_rows(c, int(h.get("from") or 0), int(h.get("to") or 0))
            return True
        if t == "ring_off":  # it cannot map the ring: rows on the socket again, from where it is
            c.ring = c.on_ring = False
            c.rows = max(0, int(h.get("from") or 0))
            return True
        if t == "bye":
            return False
        log.debug("client %s sent an unknown message %r", c.id, t)
        return True

    def _command(self, c: _Client, h: dict[str, Any]) -> None:
        cmd_id = h.get("id")
        kind = str(h.get("kind") or "")
        data = h.get("data") if isinstance(h.get("data"), dict) else {}
        base = {"t": "ack", "id": cmd_id, "client": c.id, "client_name": c.name, "kind": kind}
        try:
            parse_command(kind)
        except ConfigError as exc:
            self._broadcast({**base, "ok": False, "reason": str(exc)})
            return
        try:
            fut = self.source.submit(kind, dict(data))
        except LrvizError as exc:
            self._broadcast({**base, "ok": False, "reason": str(exc)})
            return
        fut.add_done_callback(lambda f: self._broadcast(_ack_message(base, f)))

    def _broadcast(self, msg: dict[str, Any]) -> None:
        """Queue ``msg`` for every attached client (from any thread; cheap)."""
        with self._lock:
            for c in self._clients:
                if not c.closed:
                    c.outbox.append(msg)
                    c.wake()

    def _may_send(self, c: _Client, msg: dict[str, Any]) -> bool:
        """Whether ``msg`` may go out now: an ack naming step S waits (at most ACK_HOLD_S) until the
        rows before S are published, so a client that has the ack can have every row made before it
        (a pause is acked before the run writes its last rows)."""
        step = msg.get("step") if msg.get("t") == "ack" and msg.get("ok") else None
        if step is None:
            return True
        buf = self.source.records()[0]
        if buf is None or self.source.done.is_set() or buf.first_step + len(buf) >= int(step) \
                or self._went_back(int(step)):
            c.held_since = None
            return True
        now = time.monotonic()
        if c.held_since is None:
            c.held_since = now
        if now - c.held_since >= ACK_HOLD_S:
            c.held_since = None
            return True
        return False

    def _went_back(self, step: int) -> bool:
        """Whether the run is now before ``step`` (a roll-back restored an earlier step: the rows before
        ``step`` will not all come, so its ack goes out at once)."""
        try:
            return int(self.source.snapshot().get("step") or 0) < step
        except (TypeError, ValueError):
            return False

    # ---- records out -----------------------------------------------------------------------------
    def _push(self, c: _Client, out: FrameBatch) -> None:
        src = self.source
        # The state first: the step it names is never ahead of the rows sent with it. What moves with
        # every step (the step, the epoch, a scheduled rate) rides on the steps message; a state message
        # goes out when anything else changed, and at least once a heartbeat.
        # A ring client takes the step and epoch from the rows it reads; its state messages carry the rates.
        state = src.snapshot()
        moving = jsonable({k: state.pop(k) for k in MOVING if k in state})
        buf, events, validation = src.records()
        if buf is not None and not c.on_ring:
            n = len(buf)
            ring = self._ring_for(buf) if c.ring else None
            start = ring.start if ring is not None else None
            if start is not None:  # the rows before the ring's first come from the socket
                n = min(n, start)
            self._add_rows(c, buf, n, out, moving)
            if start is not None and c.rows >= start:
                out.add({"t": "ring", "path": str(ring.path), "start": start, "capacity": ring.capacity})
                c.on_ring = True
                moving = {k: v for k, v in moving.items() if k == "lrs"}
        elif c.on_ring:
            moving = {k: v for k, v in moving.items() if k == "lrs"}
        ne = len(events)
        if ne > c.n_events:
            out.add({"t": "events", "start": c.n_events, "items": [event_dict(e) for e in events[c.n_events:ne]]})
            c.n_events = ne
        nv = len(validation)
        if nv > c.n_val:
            out.add({"t": "val", "start": c.n_val, "items": [val_dict(p) for p in validation[c.n_val:nv]]})
            c.n_val = nv
        for msg in src.lab_updates(c.lab):
            out.add({"t": "lab", **jsonable(msg)})
        now = time.monotonic()
        if _changed(state, c.state) or now - c.state_at >= HEARTBEAT_S:
            out.add({"t": "state", **jsonable(state), **moving})
            c.state, c.state_at = state, now


    def _add_rows(self, c: _Client, buf: Any, n: int, out: FrameBatch, moving: dict[str, Any]) -> None:
        """Rows ``[c.rows, n)`` as steps messages (``moving``: the step, epoch and rates they bring)."""
        while c.rows < n:
            stop = min(n, c.rows + CHUNK_ROWS)
            view = buf.view(c.rows, stop)
            k = len(view["loss"])
            if k == 0:
                break
            desc, payload = pack_columns({name: view[name] for name in STEP_COLUMNS})
            out.add({"t": "steps", "row": c.rows, "first_step": int(buf.first_step), "n": k, "cols": desc,
                     **moving}, payload)
            c.rows += k

    def _send_rows(self, c: _Client, lo: int, hi: int) -> None:
        """Rows ``[lo, hi)`` from the buffer (those published), then ``rows_done``: what a lapped ring
        client asks for. Their step, epoch and rates come from the rows themselves."""
        buf = self.source.records()[0]
        out = FrameBatch(c.sock)
        if buf is not None:
            saved = c.rows
            c.rows = max(0, lo)
            self._add_rows(c, buf, min(hi, len(buf)), out, {})
            c.rows = saved
        out.add({"t": "rows_done", "from": lo, "to": hi})
        out.flush()

    def _ring_for(self, buf: Any) -> RingWriter | None:
        """The ring that mirrors ``buf``, made once the run publishes its first rows (its buffer is
        then the one it keeps); None where there is none (TCP, or it could not be made)."""
        with self._ring_lock:
            if self._ring is not None:
                return self._ring if self._ring_buffer is buf else None
            if self._ring_path is None or not len(buf) or self._closing.is_set():
                return None
            try:
                ring = RingWriter(self._ring_path, buf.groups, int(buf.first_step), capacity=ring_mod.CAPACITY)
            except OSError as exc:
                log.warning("no shared-memory ring for local clients (%s): rows go on the socket", exc)
                self._ring_path = None
                return None
            self._ring, self._ring_buffer = ring, buf
            buf.mirror = ring  # the training thread copies its next block in
            return ring


def _changed(state: dict[str, Any], before: dict[str, Any] | None) -> bool:
    try:
        return bool(state != before)
    except (TypeError, ValueError):  # a value whose == is not a bool (an array): call it changed
        return True


def _ack_message(base: dict[str, Any], fut: Future) -> dict[str, Any]:
    exc = fut.exception()
    if exc is not None:
        reason = str(exc) if isinstance(exc, LrvizError) else f"{type(exc).__name__}: {exc}"
        return {**base, "ok": False, "reason": reason}
    return {**base, "ok": True, **jsonable(fut.result())}


def _peer_name(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return "a local process"

