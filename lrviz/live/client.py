"""A client of a live run: connects, authenticates, subscribes, sends commands, receives everything.

The client has one reader thread that hands each message to ``on_message`` (in that thread); a
:class:`lrviz.live.run.RemoteRun` builds a run's records from them. Commands return Futures that the
matching ack resolves (with the step it takes effect at) or rejects (with the reason).

A local client (Unix socket) asks for the run's shared-memory ring of step rows: once the endpoint
names it, the reader thread reads the new rows from it ~30 times a second (and before any other
message, so rows still come before the acks, states and end made after them) and hands them on as
``steps`` messages like those of the socket; rows the writer overwrote before they were read come
over the socket on request.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from lrviz.errors import ConfigError, LrvizError

from .connection import ConnectionInfo
from .protocol import (
    AuthenticationError,
    ProtocolError,
    client_handshake,
    close_socket,
    recv_frame,
    send_frame,
    unpack_columns,
)
from .ring import RingError, RingReader

log = logging.getLogger(__name__)

#: How often the reader thread reads new rows from the ring (seconds): as often as the app draws.
RING_POLL_S = 1 / 30


class CommandRejected(LrvizError):
    """A live run refused a command; the message is its reason."""


class NotLive(LrvizError):
    """The run cannot be reached (it ended, its process died, or the address is wrong)."""


class LiveClient:
    """A connection to one live run.

    ``on_message(header, payload_or_columns)`` is called in the reader thread for every message
    (``steps`` messages come with their columns decoded). ``closed`` is set when the connection
    ends; ``close_reason`` says why ("end" after the run's own end message).
    """

    def __init__(self, info: ConnectionInfo, *, name: str = "client", subscribe: bool = True,
                 since_row: int = 0, since_event: int = 0, since_val: int = 0,
                 on_message: Callable[[dict[str, Any], Any], None] | None = None, ring: bool | None = None):
        self.info = info
        #: Ask for the shared-memory ring (default: on a Unix socket, i.e. on this machine).
        self.want_ring = ring
        self.ring: RingReader | None = None
        self._next_row = since_row  # the row after the last one handed on
        self._asked = False  # rows requested over the socket and not all there yet
        self._polled = 0.0
        self.name = name
        self.subscribe = subscribe
        self.since = (since_row, since_event, since_val)
        self.on_message = on_message
        self.welcome: dict[str, Any] = {}
        self.client_id: int | None = None
        self.closed = threading.Event()
        self.close_reason = ""
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._pending_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._down = False

    def connect(self, timeout: float = 5.0) -> LiveClient:
        """Connect, authenticate and subscribe; NotLive or AuthenticationError naming the cause."""
        try:
            sock = self.info.connect(timeout)
        except OSError as exc:
            raise NotLive(f"cannot reach the run at {self.info.where}: {exc.strerror or exc}") from None
        try:
            client_handshake(sock, self.info.token, timeout)
            sock.settimeout(timeout)
            since_row, since_event, since_val = self.since
            send_frame(sock, {"t": "hello", "client": self.name, "subscribe": self.subscribe,
                              "since_row": since_row, "since_event": since_event, "since_val": since_val,
                              "ring": self.info.transport == "unix" if self.want_ring is None else self.want_ring})
            header, _ = recv_frame(sock)
            if header.get("t") != "welcome":
                raise ProtocolError(f"expected a welcome, got {header.get('t')!r}")
            sock.settimeout(None)
        except AuthenticationError as exc:
            sock.close()
            raise NotLive(f"the run at {self.info.where} refused us: {exc} (is the token right?)") from None
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise NotLive(f"the run at {self.info.where} did not answer properly: {exc}") from None
        self.welcome = header
        self.client_id = header.get("client_id")
        self._sock = sock
        self._reader = threading.Thread(target=self._read_loop, name="lrviz-live-reader", daemon=True)
        self._reader.start()
        return self

    # ---- commands -----------------------------------------------------------------------------------
    def command(self, kind: str, data: dict[str, Any] | None = None) -> Future:
        """Send a command; the Future gets the ack (``step``, ``data``) or raises CommandRejected."""
        fut: Future = Future()
        if self.closed.is_set() or self._sock is None:
            fut.set_exception(NotLive(f"not connected to the run ({self.close_reason or 'closed'})"))
            return fut
        cmd_id = next(self._ids)
        with self._pending_lock:
            self._pending[cmd_id] = fut
        try:
            with self._send_lock:
                send_frame(self._sock, {"t": "cmd", "id": cmd_id, "kind": str(kind), "data": data or {}})
        except (OSError, ValueError, TypeError) as exc:
            with self._pending_lock:
                self._pending.pop(cmd_id, None)
            if isinstance(exc, OSError):
                fut.set_exception(NotLive(f"the run is gone ({exc})"))
            else:
                fut.set_exception(ConfigError(f"cannot send {kind}: {exc}"))
        return fut

    def close(self) -> None:
        """Detach (the run goes on)."""
        sock = self._sock
        if sock is not None and not self.closed.is_set():
            try:
                with self._send_lock:
                    send_frame(sock, {"t": "bye"})
            except OSError:
                pass
        self._shutdown("closed by us")
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2.0)

    # ---- reading -----------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        reason = "the run's process closed the connection"
        try:
            while True:
                if self.ring is not None:  # never in the GUI's thread: this is the reader's
                    wait = self._polled + RING_POLL_S - time.monotonic()
                    if wait <= 0:
                        self._poll_ring()
                        wait = RING_POLL_S
                    try:
                        if not select.select([sock], [], [], wait)[0]:
                            continue
                    except ValueError:  # close() closed the socket under us
                        break
                header, payload = recv_frame(sock)
                t = header["t"]
                body: Any = payload
                if t == "steps":
                    body = unpack_columns(header.get("cols") or [], payload)
                    row, k = int(header.get("row", 0)), int(header.get("n", 0))
                    if row + k > self._next_row:
                        self._next_row = row + k
                elif self.ring is not None:  # the rows made before this message come first
                    self._poll_ring()
                if t == "ack":
                    self._resolve(header)
                elif t == "ring":
                    self._open_ring(header)
                elif t == "rows_done":
                    self._asked = False
                self._deliver(header, body)
                if t == "end":
                    reason = "end"
                    break
        except (OSError, ProtocolError) as exc:
            if not self.closed.is_set():
                reason = f"the connection broke ({exc})"
        finally:
            self._shutdown(reason)
            if self.ring is not None:
                self.ring.close()

    def _deliver(self, header: dict[str, Any], body: Any) -> None:
        if header["t"] == "steps" and "step" not in header and body:  # rows from the ring, or asked for
            _moving_from_rows(header, body)
        if self.on_message is not None:
            try:
                self.on_message(header, body)
            except Exception:  # a consumer's bug must not kill the connection
                log.exception("handling a %s message failed", header["t"])

    def _open_ring(self, h: dict[str, Any]) -> None:
        try:
            self.ring = RingReader(str(h.get("path") or ""))
        except (OSError, RingError) as exc:  # e.g. another /dev/shm (a container): rows on the socket
            log.info("cannot map the run's ring (%s): its rows come over the socket", exc)
            with self._send_lock:
                send_frame(self._sock, {"t": "ring_off", "from": self._next_row})

    def _poll_ring(self) -> None:
        """Hand on the rows published since the last ones; ask the socket for those overwritten."""
        ring = self.ring
        self._polled = time.monotonic()
        if ring is None or self._asked:
            return
        lo = self._next_row
        cols, hi = ring.read(lo)
        if cols is None:  # lapped: the buffer still has them
            self._asked = True
            with self._send_lock:
                send_frame(self._sock, {"t": "rows", "from": lo, "to": hi})
            return
        if hi > lo:
            self._next_row = hi
            self._deliver({"t": "steps", "row": lo, "first_step": ring.first_step, "n": hi - lo}, cols)

    def _resolve(self, ack: dict[str, Any]) -> None:
        if ack.get("client") != self.client_id:
            return
        with self._pending_lock:
            fut = self._pending.pop(ack.get("id"), None)  # type: ignore[arg-type]
        if fut is None or fut.done():
            return
        if ack.get("ok"):
            fut.set_result({"kind": ack.get("kind"), "step": ack.get("step"), "data": ack.get("data") or {}})
        else:
            fut.set_exception(CommandRejected(str(ack.get("reason") or "refused")))

    def _shutdown(self, reason: str) -> None:
        with self._pending_lock:
            if self._down:
                return
            self._down = True
        self.close_reason = reason
        sock = self._sock
        if sock is not None:
            close_socket(sock)
        with self._pending_lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(NotLive(f"the run went away before answering ({reason})"))
        self.closed.set()


def _moving_from_rows(h: dict[str, Any], cols: dict[str, Any]) -> None:
    """The step, epoch and rates as of a steps message's last row (what the endpoint's snapshot would say)."""
    k = len(cols["loss"])
    if not k:
        return
    h["step"] = int(h.get("first_step", 0)) + int(h.get("row", 0)) + k
    h["epoch"] = int(cols["epoch"][-1])
    lr = cols["lr"]
    h["lrs"] = [float(x) for x in (lr[-1] if lr.ndim == 2 else lr[-1:])]
