"""The lab's commands: ``lrviz find-lr`` (the range test) and ``lrviz sweep``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..plugins import load_plugin
from .common import check_out_dir, config_from_args, open_store


def cmd_find_lr(args: argparse.Namespace) -> int:
    import json

    from ..experiment import load_experiment
    from ..export import atomic_write
    from ..lab.rangetest import find_lr, write_csv

    exp = load_experiment(args.script)
    for name in ("lr", "schedule", "steps", "epochs", "eval_every", "nesterov", "checkpoint_every",
                 "divergence", "early_stopping"):
        setattr(args, name, None)
    cfg = config_from_args(exp, argparse.Namespace(**{**vars(args), "steps": None}))
    nums = {}
    for name in ("start", "end", "beta", "stop_factor"):
        try:
            nums[name] = float(getattr(args, name))
        except ValueError:
            raise ConfigError(f"--{name.replace('_', '-')} must be a number, not {getattr(args, name)!r}") from None
    ints = {}
    for flag, value in (("--steps", args.sweep_steps), ("--confirm-steps", args.confirm_steps)):
        try:
            ints[flag] = int(value)
        except ValueError:
            raise ConfigError(f"{flag} must be a whole number, not {value!r}") from None
    out = check_out_dir(args.out)
    result = find_lr(exp, cfg, steps=ints["--steps"], method=args.method, confirm=args.confirm,
                     confirm_steps=ints["--confirm-steps"], **nums)
    s = result.suggestions
    print(f"range test: {len(result.lrs)} steps from lr {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}"
          + (f" ({result.stop_reason})" if result.stop_reason else ""))
    if s.best is None and s.reason is not None:
        print(f"no suggestion: {s.reason}")
    else:
        for method, value in s.values().items():
            mark = "  <- suggested" if method == s.chosen else ""
            print(f"  {method:<14} {value:.3g}{mark}" if value is not None else f"  {method:<14} -")
        c = result.confirmation
        if c is not None:
            print(f"  {'confirmed':<14} " + (f"{s.confirmed:.3g}  <- suggested" if s.confirmed is not None else "-"))
            print(f"confirmation ({len(c.trials)} rates x {c.steps} steps): {c.reason}")
        elif result.confirm_note:
            print(result.confirm_note)
        lo, hi = s.band()
        print(f"suggested learning rate: {s.best:.3g} ({s.chosen}; band {lo:.3g} .. {hi:.3g})")
    if out is not None:
        write_csv(result, out / "lr_find.csv")
        atomic_write(out / "lr_find.json", json.dumps(result.to_dict(), indent=2, allow_nan=False))
        try:
            plots = load_plugin("plots")
        except Exception as exc:  # Qt missing: the data is still written
            print(f"lrviz: plot skipped ({exc})", file=sys.stderr)
        else:
            plots.render_range_test(result, out / "lr_find.png", title=f"LR range test — {exp.path.name}")
    return 0


def _plot_overlay(rows: list[Any], out: Path, store_path: str | None, script: str) -> None:
    """``sweep.png``: every run's loss and learning rate overlaid (needs Qt; skipped without it)."""
    ids = [(r.run_id, f"lr {r.lr:.3g}" + (" (diverged)" if r.diverged else "")) for r in rows
           if r.run_id is not None]
    if not ids:
        return
    try:
        plots = load_plugin("plots")
    except Exception as exc:  # Qt missing: the table is still written
        print(f"lrviz: sweep plot skipped ({exc})", file=sys.stderr)
        return
    store = open_store(store_path)
    try:
        data = [plots.RunData.from_store(store, rid, label=label) for rid, label in ids]
        plots.render_run(data, out / "sweep.png", title=f"LR sweep — {script}")
    finally:
        store.close()


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..lab.sweep import command

    return command(args, plot=_plot_overlay)
