"""The wire protocol between a training process (the server) and its clients.

A connection starts with a mutual challenge-response on the run's token (HMAC-SHA256), with a
timeout, before either side reads anything else. After that, both sides exchange *frames*::

    u32 header length | u32 payload length | header (UTF-8 JSON object) | payload (raw bytes)

The header's ``t`` names the message. Step columns travel as raw little-endian arrays in the
payload, described in the header (no pickle anywhere: a peer's bytes are never executed).

Client -> server: ``hello`` (subscribe, from a step on, ``ring``: read the rows from the run's
shared-memory ring), ``cmd`` (a command with the client's id), ``rows`` (rows ``from``..``to`` again:
the ring overwrote them before they were read), ``ring_off`` (the ring cannot be mapped: rows on the
socket again, from a row), ``bye``. Server -> client: ``welcome``, ``steps``, ``events``, ``val``,
``state``, ``lab``, ``ack`` (to every client), ``ring`` (its path, once the rows before its first
are sent), ``rows_done`` (the end of a ``rows`` answer), ``end``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from lrviz.store.codec import jsonable

#: Bumped when a message changes incompatibly; both sides say theirs in the handshake.
PROTOCOL_VERSION = 1
MAGIC = b"LRVIZ-LIVE-1\n"
NONCE_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 256 << 20
_FRAME = struct.Struct(">II")
#: The parts of a run's state that change with every step: a steps message carries them (as of its
#: last row), and a state message goes out only when something else changed (or as a heartbeat).
MOVING = ("step", "epoch", "lrs")
#: The byte a server sends a client whose answer to the challenge was wrong.
REFUSED = b"\x00"


class ProtocolError(Exception):
    """The peer broke the protocol (bad frame, wrong token, closed mid-message)."""


class AuthenticationError(ProtocolError):
    """The peer does not hold the run's token."""


def new_token() -> str:
    """A fresh random token (hex, 256 bits)."""
    return secrets.token_hex(32)


def _mac(token: str, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(token.encode(), role + nonce, hashlib.sha256).digest()


# ---- raw socket I/O ------------------------------------------------------------------------------
def close_socket(sock: socket.socket) -> None:
    """Shut a socket down (a thread blocked reading it wakes with EOF) and close it; never raises."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes (ProtocolError when the peer closes first)."""
    if n == 0:
        return b""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProtocolError("the connection was closed")
        got += k
    return bytes(buf)


def encode_frame(header: Mapping[str, Any], payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """One frame (header as JSON, payload as raw bytes) as the pieces to write, in order."""
    head = json.dumps(header, allow_nan=False, separators=(",", ":"), default=_json_default).encode()
    prefix = _FRAME.pack(len(head), len(payload)) + head
    return [prefix, payload] if len(payload) else [prefix]


def send_frame(sock: socket.socket, header: Mapping[str, Any], payload: bytes | memoryview = b"") -> None:
    """Send one frame (header as JSON, payload as raw bytes)."""
    for part in encode_frame(header, payload):
        sock.sendall(part)


class FrameBatch:
    """Frames gathered and written together: one ``sendall`` for many small frames (each write costs
    the sender a system call and the reader a wake-up), flushed early past ``limit`` bytes so a long
    history never sits whole in memory."""

    def __init__(self, sock: socket.socket, limit: int = 1 << 20):
        self.sock = sock
        self.limit = limit
        self._parts: list[bytes | memoryview] = []
        self._size = 0

    def add(self, header: Mapping[str, Any], payload: bytes | memoryview = b"") -> None:
        parts = encode_frame(header, payload)
        self._parts.extend(parts)
        self._size += sum(len(p) for p in parts)
        if self._size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts, self._size = [], 0
            self.sock.sendall(data)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Receive one frame: (header, payload)."""
    hlen, plen = _FRAME.unpack(recv_exact(sock, _FRAME.size))
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large ({hlen} + {plen} bytes)")
    try:
        header = json.loads(recv_exact(sock, hlen))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"bad frame header: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ProtocolError("bad frame header: not a message")
    return header, recv_exact(sock, plen)


def _json_default(obj: Any) -> Any:
    return jsonable(obj)


# ---- the handshake -------------------------------------------------------------------------------
def server_handshake(sock: socket.socket, token: str, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Prove the client holds ``token`` (and prove we do); AuthenticationError otherwise (then send
    :data:`REFUSED` and close). Nothing else is read from the peer before this returns.
    """
    sock.settimeout(timeout)
    nonce = os.urandom(NONCE_BYTES)
    sock.sendall(MAGIC + nonce)
    try:
        answer = recv_exact(sock, 32 + NONCE_BYTES)
    except (OSError, ProtocolError) as exc:
        raise AuthenticationError(f"no answer to the challenge ({exc})") from None
    mac, client_nonce = answer[:32], answer[32:]
    if not hmac.compare_digest(mac, _mac(token, b"client", nonce)):
        raise AuthenticationError("wrong token")  # the caller logs it, then sends the refusal
    sock.sendall(b"\x01" + _mac(token, b"server", client_nonce))
    sock.settimeout(None)


def client_handshake(sock: socket.socket, token: str, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Answer the server's challenge and check its answer to ours."""
    sock.settimeout(timeout)
    try:
        head = recv_exact(sock, len(MAGIC) + NONCE_BYTES)
    except TimeoutError:
        raise ProtocolError("the run did not answer (is it an lrviz endpoint?)") from None
    if not head.startswith(MAGIC):
        raise ProtocolError("not an lrviz live endpoint (or another protocol version)")
    nonce = head[len(MAGIC):]
    mine = os.urandom(NONCE_BYTES)
    sock.sendall(_mac(token, b"client", nonce) + mine)
    verdict = recv_exact(sock, 1)
    if verdict != b"\x01":
        raise AuthenticationError("the run refused the token")
    theirs = recv_exact(sock, 32)
    if not hmac.compare_digest(theirs, _mac(token, b"server", mine)):
        raise AuthenticationError("the run could not prove it holds the token")
    sock.settimeout(None)


# ---- step columns as raw arrays ----------------------------------------------------------------
def pack_columns(columns: Mapping[str, np.ndarray]) -> tuple[list[list[Any]], bytes]:
    """Describe and concatenate arrays: ``[[name, dtype, shape], ...]`` and their bytes."""
    desc: list[list[Any]] = []
    parts: list[bytes] = []
    for name, arr in columns.items():
        a = np.ascontiguousarray(arr)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        desc.append([name, a.dtype.str, list(a.shape)])
        parts.append(a.tobytes())
    return desc, b"".join(parts)


def unpack_columns(desc: list[list[Any]], payload: bytes) -> dict[str, np.ndarray]:
    """The arrays :func:`pack_columns` described (copies that own their memory)."""
    out: dict[str, np.ndarray] = {}
    off = 0
    for item in desc:
        try:
            name, dtype, shape = item
            dt = np.dtype(dtype)
            if dt.hasobject:
                raise ProtocolError("object arrays are not accepted")
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            size = count * dt.itemsize
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad column description {item!r}: {exc}") from None
        if off + size > len(payload):
            raise ProtocolError("column data shorter than described")
        out[str(name)] = np.frombuffer(payload, dtype=dt, count=count, offset=off).reshape(shape).copy()
        off += size
    return out
