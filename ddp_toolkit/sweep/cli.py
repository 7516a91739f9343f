"""`ddp-toolkit sweep SWEEP.yaml [--out DIR] [--processes W] [--dry-run]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddp_toolkit.sweep.execution import is_finished
from ddp_toolkit.sweep.points import expand_points
from ddp_toolkit.sweep.run import print_verdict, run_sweep, say
from ddp_toolkit.sweep.spec import load_sweep

__all__ = ["add_sweep_parser"]


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """The `sweep` subcommand; errors are ToolkitErrors (bad file: exit 2, a sweep that cannot go on: 1)."""
    p = sub.add_parser("sweep", help="train global batch sizes × lr rules on one sample budget; table, plots, "
                                     "verdict")
    p.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file (see configs/sweeps/default.yaml)")
    p.add_argument("--out", help="output directory (default runs/sweeps/<file name>); a rerun skips finished points")
    p.add_argument("--processes", type=int, help="W processes per point under torch.distributed.run (default: the "
                                                 "file's `processes`; 1 trains in this process with accumulation)")
    p.add_argument("--dry-run", action="store_true", help="list the points (and which are finished), train nothing")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep_file)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / sweep.name
    if args.dry_run:
        _dry_run(sweep, out, args.processes)
        return 0
    report = run_sweep(sweep, out, args.processes)
    print_verdict(report, sweep.spec.metric, out)
    return 0


def _dry_run(sweep, out: Path, processes: int | None) -> None:
    if sweep.spec.lr_grid:
        say("main points are listed at the base config's lr; the grid at B_ref picks the lr they train with")
    for p in expand_points(sweep, out, processes):
        state = f"same run as {p.same_as.label}" if p.same_as else ("finished" if is_finished(p) else "to train")
        say(f"[{p.stage}] {p.label}: W={p.world_size} b={p.config.batch.micro_batch_size} "
            f"iterations={p.config.train.iterations} lr={p.config.optim.lr:g} → {p.run_dir} ({state})")
