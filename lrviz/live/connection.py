"""Connection files: how a client finds a live run and proves it may talk to it.

Like a Jupyter kernel's connection file: a small JSON file, readable only by its user, with the
address of the run's endpoint and its token. Runs recorded in a store keep theirs in the store's
``live/`` folder as ``run-ID.json``; the file is removed when the run ends. A file whose process
is gone (a crash, a kill -9) is *stale*: finders ignore and remove it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lrviz.errors import ConfigError

from .protocol import PROTOCOL_VERSION

LIVE_DIR = "live"
#: Unix socket paths longer than this do not fit ``sockaddr_un`` on every platform.
MAX_UNIX_PATH = 100


@dataclass
class ConnectionInfo:
    """Where a live run listens and the token it wants.

    ``transport`` is ``unix`` (``address`` is the socket's path) or ``tcp`` (``address`` the host,
    with ``port``). ``hostname`` and ``pid`` say which process serves, so a stale file is known.
    """

    transport: str
    address: str
    token: str
    port: int | None = None
    pid: int = field(default_factory=os.getpid)
    hostname: str = field(default_factory=socket.gethostname)
    run_id: int | None = None
    store: str | None = None
    created: float = field(default_factory=time.time)
    version: int = PROTOCOL_VERSION
    #: The shared-memory ring of step rows local clients map (a path; made when the first asks).
    ring: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConnectionInfo:
        try:
            return cls(
                transport=str(data["transport"]), address=str(data["address"]), token=str(data["token"]),
                port=int(data["port"]) if data.get("port") is not None else None,
                pid=int(data.get("pid") or 0), hostname=str(data.get("hostname") or ""),
                run_id=int(data["run_id"]) if data.get("run_id") is not None else None,
                store=data.get("store"), created=float(data.get("created") or 0.0),
                version=int(data.get("version") or PROTOCOL_VERSION),
                ring=str(data["ring"]) if data.get("ring") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not an lrviz connection file ({exc})") from None

    @property
    def where(self) -> str:
        """The address for people: ``unix:/path`` or ``HOST:PORT``."""
        return f"unix:{self.address}" if self.transport == "unix" else f"{self.address}:{self.port}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A connected socket to the endpoint (OSError when nothing listens there)."""
        if self.transport == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.address, int(self.port or 0)), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def process_gone(self) -> bool:
        """True when the serving process is known to be dead (same machine, pid not alive)."""
        if self.hostname and self.hostname != socket.gethostname():
            return False
        return not pid_alive(self.pid)


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists (and is not a zombie we could see)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT``, ``PORT``) for ``--listen``; ConfigError naming what is wrong."""
    host, sep, port_text = str(text).strip().rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:7000 or 0.0.0.0:7000") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--listen {text!r}: the port must be between 0 and 65535")
    return host, port


# ---- files ----------------------------------------------------------------------------------------
def live_dir(store_path: str | os.PathLike) -> Path:
    """The folder of a store's connection files (beside the database)."""
    return Path(store_path).parent / LIVE_DIR


def connection_path(store_path: str | os.PathLike, run_id: int) -> Path:
    return live_dir(store_path) / f"run-{int(run_id)}.json"


def private_dir(path: Path) -> Path:
    """Create ``path`` readable by this user only."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    return path


def socket_path(folder: Path | None) -> Path:
    """A fresh Unix socket path in ``folder`` (or a private temp folder when that path is too long)."""
    name = f"{os.getpid()}-{os.urandom(4).hex()}.sock"
    if folder is not None:
        cand = private_dir(folder) / name
        if len(str(cand)) <= MAX_UNIX_PATH:
            return cand
    return Path(tempfile.mkdtemp(prefix="lrviz-")) / name


def write_connection(path: Path, info: ConnectionInfo) -> None:
    """Write ``info`` atomically, readable and writable by this user only."""
    from lrviz.export import atomic_write

    private_dir(path.parent)
    atomic_write(path, json.dumps(info.to_dict(), indent=1), mode=0o600)


def read_connection(path: str | os.PathLike) -> ConnectionInfo:
    """The connection file at ``path``; ConfigError when missing or not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such connection file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the connection file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: not an lrviz connection file")
    return ConnectionInfo.from_dict(data)


def remove_quietly(path: str | os.PathLike | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def find_live(store_path: str | os.PathLike, run_id: int) -> ConnectionInfo | None:
    """The connection of run ``run_id`` when its process is alive; a stale file is removed."""
    path = connection_path(store_path, run_id)
    if not path.exists():
        return None
    try:
        info = read_connection(path)
    except ConfigError:
        return None
    if info.process_gone():
        remove_quietly(path)
        if info.transport == "unix":
            remove_quietly(info.address)
        if info.ring and Path(info.ring).name.startswith("lrviz-ring-"):
            remove_quietly(info.ring)
        return None
    return info


def live_runs(store_path: str | os.PathLike) -> dict[int, ConnectionInfo]:
    """Every run of the store whose training process serves it now (stale files removed)."""
    folder = live_dir(store_path)
    out: dict[int, ConnectionInfo] = {}
    if not folder.is_dir():
        return out
    for path in folder.glob("run-*.json"):
        try:
            run_id = int(path.stem.split("-", 1)[1])
        except (IndexError, ValueError):
            continue
        info = find_live(store_path, run_id)
        if info is not None:
            out[run_id] = info
    return out
