"""Finding a live run from what a person types: a run id or name, ``HOST:PORT`` with a token, or a
connection file."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrviz.errors import ConfigError

from .client import LiveClient, NotLive
from .connection import ConnectionInfo, find_live, read_connection

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def resolve(ref: str, *, store_path: str | None = None, token: str | None = None) -> tuple[ConnectionInfo, str]:
    """The connection of the live run ``ref`` and a label for it; NotLive/ConfigError saying why not."""
    ref = str(ref).strip()
    if ref.endswith(".json") and Path(ref).expanduser().exists():
        return read_connection(Path(ref).expanduser()), ref
    m = _HOST_PORT.match(ref)
    if m and not ref.isdigit():
        if not token:
            raise ConfigError(f"{ref}: give the run's --token (printed by `lrviz run --listen`)")
        return ConnectionInfo("tcp", m.group(1).strip("[]"), token, port=int(m.group(2)), pid=0, hostname=""), ref
    from lrviz.store.runs import RunStore

    store = RunStore(store_path)
    try:
        run = store.get_run(ref)
        info = find_live(store.path, run.id)
        if info is None:
            raise NotLive(f"run {run.id} ({run.name}) is not live: it is {run.status}")
        if token:
            info.token = token
        return info, f"run {run.id} ({run.name})"
    finally:
        store.close()


def connect_to(ref: str, *, store_path: str | None = None, token: str | None = None,
               name: str = "lrviz steer", subscribe: bool = False, **kwargs: Any) -> tuple[LiveClient, str]:
    """A connected client of the live run ``ref`` (see :func:`resolve`)."""
    info, label = resolve(ref, store_path=store_path, token=token)
    return LiveClient(info, name=name, subscribe=subscribe, **kwargs).connect(), label


def command_words(kind: str, data: dict[str, Any], number: Callable[[Any], str] = str) -> str:
    """A command in words: ``lr 0.01``, ``schedule StepLR:step_size=10``, ``momentum 0.9``, ``pause``."""
    kind = str(kind)
    if kind == "set_lr":
        return f"lr {number(data['lr'])}"
    if kind == "set_schedule":
        return f"schedule {data.get('spec') or 'none'}"
    if kind == "set_hyperparams":
        return ", ".join(f"{k.replace('_', ' ')} {number(v)}" for k, v in data.items() if v is not None)
    if kind == "set_clip":
        clip = data.get("clip_grad_norm")
        return f"clip grad norm {number(clip)}" if clip is not None else "no clipping"
    return kind.replace("_", " ")


def ack_phrase(kind: str, ack: dict[str, Any], number: Callable[[Any], str] = lambda v: f"{v:.3g}") -> str:
    """What an accepted command's ack says: ``from step 1234``, ``paused before step 12``, a roll-back's
    restored checkpoint (``from step 90 (restored the checkpoint of step 80, lr 0.005)``)."""
    kind = str(kind)
    verb = {"pause": "paused before step", "stop": "stops before step", "resume": "resumes at step",
            "step_once": "runs step"}.get(kind, "from step")
    d = ack.get("data") or {}
    extra = ""
    if kind == "rollback":
        extra = f" (restored the checkpoint of step {d.get('to_step')}, lr {number(d.get('lr', float('nan')))})"
    elif kind == "checkpoint":
        extra = f" ({d.get('path')})"
    return f"{verb} {ack.get('step')}{extra}"
