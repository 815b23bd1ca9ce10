"""The commands that train: ``lrviz run`` (also ``--fork``), ``lrviz resume`` and ``lrviz replay``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import (
    check_at_steps,
    check_out_dir,
    config_from_args,
    finish_run,
    load_script,
    note_unapplied,
    open_store,
    train_headless,
)


def cmd_run(args: argparse.Namespace) -> int:
    from ..engine import TrainingEngine
    from ..interventions import parse_at

    exp = load_script(args.script)
    ats = [parse_at(a) for a in args.at]
    own_ats = list(ats)
    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        store.require_writable()
        origin = None
        if args.fork:
            origin, ats = fork_origin(store, args.fork, args, ats)
            cfg = config_from_args(exp, args, base=store.get_run(origin.run_id).config)
        else:
            cfg = config_from_args(exp, args)
        check_at_steps(args.at, own_ats, cfg.steps)
        engine = TrainingEngine(exp, cfg, store, interventions=ats, name=args.name, origin=origin,
                                distributed=getattr(args, "distributed", None))
        with _serving(engine, store, args):
            train_headless(engine, args.quiet)
        status = finish_run(engine, store, out, args.quiet)
        note_unapplied(args.at, own_ats, engine)
        return status
    finally:
        store.close()


def _serving(engine: Any, store: Any, args: argparse.Namespace) -> Any:
    """Serve the run live while it trains (a local socket; also TCP with --listen)."""
    from ..live.serve import serving

    if cfg_pauses(engine) and not args.quiet:
        engine.on_open.append(lambda run_id: print(
            f"lrviz: run {run_id} pauses if it diverges; steer it with `lrviz steer {run_id} --rollback --resume` "
            f"(or --lr X --resume, or --stop)", file=sys.stderr, flush=True))
    return serving(engine, store, listen=getattr(args, "listen", None), announce=getattr(args, "listen", None) is not None)


def cfg_pauses(engine: Any) -> bool:
    return engine.config.divergence == "pause"


def checkpoint_events(store: Any, run_id: int) -> dict[int, str]:
    """Step -> checkpoint file of a stored run's checkpoints that still exist."""
    out = {}
    for e in store.load_events(run_id):
        if e.kind == "checkpoint" and Path(e.data.get("path", "")).exists():
            out[e.step] = e.data["path"]
    return out


def fork_origin(store: Any, ref: str, args: argparse.Namespace, ats: list[Any]) -> tuple[Any, list[Any]]:
    """The Origin of ``--fork RUN@STEP``; the settings given on the command line apply from STEP."""
    from ..engine import Origin
    from ..interventions import Intervention, check, step_number

    run_ref, at, step_text = ref.rpartition("@")
    if not at or not run_ref:
        raise ConfigError(f"--fork {ref!r}: use RUN@STEP, e.g. 3@500 (see `lrviz runs`)")
    step = step_number(step_text, f"--fork {ref!r}")
    parent = store.get_run(run_ref)
    parent.require_trainable("forked")
    points = checkpoint_events(store, parent.id)
    if step not in points:
        have = ", ".join(str(k) for k in sorted(points)) or "none (run it with --checkpoint-every N)"
        raise ConfigError(f"--fork {ref!r}: run {parent.id} has no checkpoint at step {step}; it has: {have}")
    extra = []
    if args.lr is not None:
        extra.append(Intervention(step, "set_lr", check("set_lr", {"lr": args.lr})))
    if args.schedule is not None:
        extra.append(Intervention(step, "set_schedule", check("set_schedule", {"spec": args.schedule})))
    hp = {"momentum": args.momentum, "weight_decay": args.weight_decay}
    if any(v is not None for v in hp.values()):
        extra.append(Intervention(step, "set_hyperparams", check("set_hyperparams", hp)))
    if getattr(args, "clip_grad_norm", None) is not None:  # the checkpoint holds the parent's threshold
        extra.append(Intervention(step, "set_clip", check("set_clip", {"clip_grad_norm": args.clip_grad_norm})))
    return Origin("fork", parent.id, Path(points[step]), step), extra + ats


def _stored_run(args: argparse.Namespace, verb: str) -> tuple[Path | None, Any, Any]:
    """The output folder, the open store and run ``args.run`` in it, which can be ``verb`` (else a
    ConfigError, with the store closed). The caller closes the store."""
    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        info = store.get_run(args.run)
        info.require_trainable(verb)
    except BaseException:
        store.close()
        raise
    return out, store, info


def cmd_resume(args: argparse.Namespace) -> int:
    from ..config import RunConfig
    from ..engine import Origin, TrainingEngine
    from ..experiment import load_experiment

    out, store, info = _stored_run(args, "resumed")
    try:
        if info.status in ("running", "paused"):
            raise ConfigError(f"run {info.id} is {info.status} in another process; stop it there first")
        points = checkpoint_events(store, info.id)
        if not points:
            raise ConfigError(f"run {info.id} has no checkpoint to resume from (runs keep checkpoints when "
                              "started with --checkpoint-every N, and in the app at every pause)")
        step = max(points)
        exp = load_experiment(info.script_path)
        cfg = RunConfig.from_dict(info.config)
        if args.steps is not None:
            cfg.steps, cfg.epochs = args.steps, None
        engine = TrainingEngine(exp, cfg, store, origin=Origin("resume", info.id, Path(points[step]), step),
                                distributed=getattr(args, "distributed", None))
        print(f"resuming run {info.id} from its checkpoint at step {step}", file=sys.stderr)
        with _serving(engine, store, args):
            train_headless(engine, args.quiet)
        return finish_run(engine, store, out, args.quiet)
    finally:
        store.close()


def replay_origin(store: Any, info: Any) -> Any:
    """Where a replay of run ``info`` starts: a fork child from its parent's checkpoint at the fork
    step (as the child did), any other run from step 0 (None)."""
    from ..engine import Origin

    if info.parent_id is None or info.fork_step is None:
        return None
    points = checkpoint_events(store, info.parent_id)
    if info.fork_step not in points:
        raise ConfigError(f"run {info.id} is a fork of run {info.parent_id} at step {info.fork_step}, and that "
                          "checkpoint is gone: the fork cannot be replayed")
    return Origin("fork", info.parent_id, Path(points[info.fork_step]), info.fork_step)


def cmd_replay(args: argparse.Namespace) -> int:
    from ..config import RunConfig
    from ..engine import TrainingEngine
    from ..experiment import load_experiment
    from ..interventions import from_events

    out, store, info = _stored_run(args, "replayed")
    try:
        exp = load_experiment(info.script_path)
        if exp.source_hash != info.script_hash:
            print(f"lrviz: warning: {info.script_path} changed since run {info.id}; the replay may differ",
                  file=sys.stderr)
        cfg = RunConfig.from_dict(info.config)
        origin = replay_origin(store, info)
        first = origin.step if origin is not None else 0
        if info.steps:
            cfg.steps, cfg.epochs = first + info.steps, None  # exactly as many steps as the original ran
        events = store.load_events(info.id)
        engine = TrainingEngine(exp, cfg, store, interventions=from_events(events), origin=origin,
                                name=f"replay of {info.name}", distributed=getattr(args, "distributed", None))
        with _serving(engine, store, args):
            train_headless(engine, args.quiet)
        status = finish_run(engine, store, out, args.quiet)
        original = store.load_steps(info.id)["loss"]
        replayed = store.load_steps(engine.run_id)["loss"]
        n = min(len(original), len(replayed))
        same = (original[:n].tobytes() == replayed[:n].tobytes()) and len(original) == len(replayed)
        if same:
            print(f"replay {engine.run_id} of run {info.id}: loss trace identical ({n} steps)", file=sys.stderr)
        else:
            diff = [i for i in range(n) if original[i].tobytes() != replayed[i].tobytes()]
            first = diff[0] if diff else n
            print(f"replay {engine.run_id} of run {info.id}: loss traces differ from step {first} "
                  f"({len(original)} vs {len(replayed)} steps)", file=sys.stderr)
        return status
    finally:
        store.close()
