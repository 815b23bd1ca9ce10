"""Serving a training engine live: the endpoint around ``lrviz run`` and the app's worker runs.

``serving(engine, store)`` starts the endpoint before training (so a client can watch a run while
it prepares), registers the connection file beside the store as soon as the run has an id, and
removes it when the run ends. ``build_engine(spec)`` makes the engine a run spec describes (what
the app sends its worker).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .connection import connection_path, live_dir
from .endpoint import LiveEndpoint
from .source import RunSource


@contextmanager
def serving(engine: Any, store: Any, *, listen: str | None = None, announce: bool = False) -> Iterator[LiveEndpoint]:
    """Serve ``engine`` while the block runs. ``announce`` prints where, for ``--listen``."""
    store_path = str(store.path) if store is not None else None
    folder = live_dir(store_path) if store_path else None
    endpoint = LiveEndpoint(RunSource(engine, store_path=store_path), listen=listen, folder=folder)
    info = endpoint.start()

    def opened(run_id: int) -> None:
        if store_path is not None:
            endpoint.register(connection_path(store_path, run_id), run_id, store_path, row=store)
        if announce:
            print(how_to_connect(info, run_id), file=sys.stderr, flush=True)

    engine.on_open.append(opened)
    try:
        yield endpoint
    finally:
        endpoint.close()


def serve_recorded(run: Any, store: Any, *, listen: str | None = None, announce: bool = False) -> LiveEndpoint:
    """Serve a run whose store row already exists (``lrviz.track``); the caller closes the endpoint."""
    store_path = str(store.path) if store is not None else None
    endpoint = LiveEndpoint(RunSource(run, store_path=store_path), listen=listen,
                            folder=live_dir(store_path) if store_path else None)
    info = endpoint.start()
    if store_path is not None and run.run_id is not None:
        endpoint.register(connection_path(store_path, run.run_id), run.run_id, store_path, row=store)
    if announce:
        print(how_to_connect(info, run.run_id), file=sys.stderr, flush=True)
    return endpoint


def how_to_connect(info: Any, run_id: int | None) -> str:
    """What ``lrviz run --listen`` prints: where the run listens and how to attach from elsewhere."""
    import socket

    host = info.address
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    where = f"{host}:{info.port}"
    return (f"lrviz: run {run_id} is live on {info.address}:{info.port}\n"
            f"  steer it:  lrviz steer {where} --token {info.token} --lr 0.01\n"
            f"  watch it:  in the app, File > Connect to a run..., address {where}, token {info.token}\n"
            "  (the token is the only protection: share it like a password, or tunnel over SSH)")


def build_engine(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The engine (and store, or None) of a run spec; ScriptError/ConfigError when it is wrong.

    ``spec``: ``script``, ``config`` (a RunConfig dict), optional ``name``, ``store`` (a path; absent:
    not stored), ``start_paused``, ``interventions`` (``[step, kind, data]``), ``origin``
    (``{kind, run_id, checkpoint, step}``: a fork or a resume), ``engine`` (extra engine options:
    ``layer_stats_every``, ``keep_checkpoints``, ``stop_on_divergence``).
    """
    from lrviz.config import RunConfig
    from lrviz.engine import Origin, TrainingEngine
    from lrviz.experiment import load_experiment
    from lrviz.interventions import Intervention, check

    exp = load_experiment(spec["script"])
    cfg = RunConfig.from_dict(dict(spec.get("config") or {})).validated()
    ats = [Intervention(int(s), str(k), check(str(k), dict(d))) for s, k, d in spec.get("interventions") or ()]
    origin = None
    if spec.get("origin"):
        o = spec["origin"]
        origin = Origin(str(o["kind"]), int(o["run_id"]), Path(o["checkpoint"]), int(o["step"]))
    store = None
    if spec.get("store"):
        from lrviz.store.runs import RunStore

        store = RunStore(spec["store"])
    extra = {k: v for k, v in (spec.get("engine") or {}).items()
             if k in ("layer_stats_every", "keep_checkpoints", "stop_on_divergence")}
    engine = TrainingEngine(exp, cfg, store, interventions=ats, name=spec.get("name"),
                            start_paused=bool(spec.get("start_paused")), origin=origin, **extra)
    return engine, store
