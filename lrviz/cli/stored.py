"""The commands on stored and live runs: ``lrviz runs``, ``lrviz steer``, ``lrviz export``, ``lrviz import``."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import ConfigError
from .common import check_out_dir, open_store


def cmd_runs(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    try:
        runs = store.list_runs()
        if not runs:
            print(f"no runs in {store.path}")
            return 0
        from ..live.connection import live_runs

        live = live_runs(store.path)
        print(f"{'id':>4}  {'name':<28} {'status':<11} {'steps':>8} {'best loss':>10} {'final loss':>10}  "
              f"{'started':<16}  live")
        for r in runs:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at or r.created_at))
            best = f"{r.best_loss:.4g}" if r.best_loss is not None else "-"
            final = f"{r.final_loss:.4g}" if r.final_loss is not None else "-"
            mark = "imported" if r.kind == "imported" else ""
            if r.id in live:
                info = live[r.id]
                mark = "live" + (f" {info.address}:{info.port}" if info.transport == "tcp" else "")
            print(f"{r.id:>4}  {r.name[:28]:<28} {r.status:<11} {r.steps:>8} {best:>10} {final:>10}  "
                  f"{started:<16}  {mark}".rstrip())
        return 0
    finally:
        store.close()


def cmd_steer(args: argparse.Namespace) -> int:
    """Send each steering flag to a live run, in order; print what each was answered."""
    from ..interventions import check
    from ..live.run import CommandRejected, NotLive
    from ..live.steer import ack_phrase, command_words, connect_to

    actions = list(args.actions or [])
    if args.lr_factor is not None:
        if not any(kind == "rollback" for kind, _ in actions):
            raise ConfigError("--lr-factor goes with --rollback")
        actions = [(k, {"lr_factor": args.lr_factor} if k == "rollback" else d) for k, d in actions]
    if not actions:
        raise ConfigError("nothing to do: give at least one of --lr, --schedule, --momentum, --weight-decay, "
                          "--clip-grad-norm, --pause, --resume, --step-once, --stop, --checkpoint, --rollback")
    try:
        timeout = float(args.timeout)
    except ValueError:
        raise ConfigError(f"--timeout must be a number of seconds, not {args.timeout!r}") from None
    for kind, data in actions:  # refuse a bad value here, before anything is sent
        if kind in ("set_lr", "set_schedule", "set_hyperparams", "set_clip", "rollback"):
            check(kind, data)
    client, label = connect_to(args.run, store_path=args.store, token=args.token)
    refused = 0
    try:
        for kind, data in actions:
            what = command_words(kind, data)
            try:
                ack = client.command(kind, data).result(timeout)
            except CommandRejected as exc:
                refused += 1
                print(f"{what}: refused: {exc}")
                continue
            except TimeoutError:
                refused += 1
                print(f"{what}: no answer within {timeout:g} s (the run may be busy in a long step or validation)")
                continue
            except NotLive as exc:
                print(f"{what}: {exc}")
                return 1
            print(f"{what}: accepted: {ack_phrase(kind, ack)}")
    finally:
        client.close()
    print(f"({label})", file=sys.stderr)
    return 1 if refused else 0


def _load_plots() -> None:
    """Load the plot renderer (Qt, found by name: lrviz.plugins) for plot exports; it registers itself."""
    from ..plugins import load_plugin

    try:
        load_plugin("plots")
    except ImportError as exc:
        raise ConfigError(f"plot export needs PySide6 and pyqtgraph ({exc}); install them "
                          "(pip install PySide6-Essentials pyqtgraph) or export only csv and json "
                          "(--format csv,json)") from None


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import IMAGE_FORMATS, export_run

    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    if any(f in IMAGE_FORMATS for f in formats):
        _load_plots()
    out = check_out_dir(args.out)
    store = open_store(args.store)
    try:
        info = store.get_run(args.run)
        paths = export_run(store, info.id, out, formats)
        for p in paths:
            print(p)
        return 0
    finally:
        store.close()


def cmd_import(args: argparse.Namespace) -> int:
    from ..tensorboard import import_logs

    lr = [t.strip() for t in args.lr.split(",") if t.strip()] if args.lr is not None else None
    store = open_store(args.store)
    try:
        made, notes = import_logs(store, os.path.abspath(os.path.expanduser(args.dir)), name=args.name,
                                  loss=args.loss, lr=lr, partial=args.partial)
    finally:
        store.close()
    for note in notes:
        print(f"lrviz: note: skipped {note}", file=sys.stderr)
    for m in made:
        steps = m.steps
        span = f"steps {steps[0]}..{steps[-1]}" if len(steps) else "no steps"
        print(f"imported run {m.run_id} '{m.name}' from {m.folder} "
              f"({m.files} event file{'s' if m.files != 1 else ''}): {len(steps):,} steps ({span})")
        also = f" (also like a loss: {', '.join(m.other_loss_tags)}; choose with --loss TAG)" if m.other_loss_tags else ""
        print(f"  loss  <- {m.loss_tag!r}{also}")
        print(f"  lr    <- {', '.join(repr(t) for t in m.lr_tags)}" if m.lr_tags
              else "  lr    <- no learning-rate tag (name one with --lr TAG)")
        if m.scalar_tags:
            print(f"  extra scalar series: {', '.join(m.scalar_tags)}")
        if m.replaced:
            print(f"  {m.replaced} points were logged again at a step already logged: the last one is kept")
        if m.damage:
            print(f"  --partial: {m.damage}; what comes before it was imported")
    return 0
