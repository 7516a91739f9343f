"""A sweep from start to end: the lr grid at B_ref, every point, then steps-to-target, the verdict and the
files (results.csv, results.md, plots, verdict.json)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddp_toolkit.sweep.analysis import Verdict, best_lr, default_target, steps_to_target, verdicts
from ddp_toolkit.sweep.execution import run_points, set_threads
from ddp_toolkit.sweep.output import markdown, num, write_csv
from ddp_toolkit.sweep.plots import write_plots
from ddp_toolkit.sweep.points import grid_points, main_points, world_size_for
from ddp_toolkit.sweep.results import PointResult
from ddp_toolkit.sweep.spec import Sweep

__all__ = ["SweepReport", "run_sweep", "print_verdict"]


def say(text: str) -> None:
    print(text, flush=True)


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


@dataclass
class SweepReport:
    """What a sweep found (also verdict.json): the verdict per rule, the target, the base lr, the counts."""

    verdicts: list[Verdict]
    target: float | None
    base_lr: float
    base_lr_text: str
    world_size: int
    seeds: list[int]
    wall_seconds: float
    trained: int
    skipped: int
    failed: list[str] = field(default_factory=list)
    """Labels of the points whose run broke (left out of the verdict, retried by a rerun)."""
    plots: list[Path] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self), "plots": [p.name for p in self.plots]}


def _point_line(r: PointResult) -> str:
    if r.status != "finished":
        return r.status
    return (f"W×k×b = {r.world_size}×{r.grad_accum_steps}×{r.micro_batch_size}, {r.iterations} it, train loss "
            f"{num(r.final_train_loss)}, eval acc {num(r.eval_accuracy)}, B_simple {num(r.grad_noise_scale, 3)}")


def run_sweep(sweep: Sweep, out: Path, world_size: int | None = None) -> SweepReport:
    """Grid (if any), then every point; results.csv, results.md, plots, verdict.json in `out`."""
    spec, W = sweep.spec, world_size_for(sweep, world_size)
    out.mkdir(parents=True, exist_ok=True)
    t0, counter = time.perf_counter(), {"trained": 0, "skipped": 0}
    threads = set_threads(spec.threads)
    try:
        grid = grid_points(sweep, out, W)
        grid_results = run_points(grid, counter, say, _point_line)
        if grid:
            base_lr, lr_text = best_lr(grid_results, spec.metric)
        else:
            base_lr = sweep.base.optim.lr
            lr_text = f"{base_lr:g} (base config; no grid)"
        main = main_points(sweep, out, W, base_lr, grid)
        results = grid_results + run_points(main, counter, say, _point_line)
    finally:
        set_threads(threads)
    report = SweepReport([], None, base_lr, lr_text, W, sweep.seeds, time.perf_counter() - t0, **counter)
    return _finish(sweep, results, out, report)


def _target(sweep: Sweep, results: list[PointResult], verdict_rules: set[str]) -> float | None:
    """The sweep file's target, else what the worst rule's B_ref runs reach after half their budget."""
    if sweep.spec.target is not None:
        return sweep.spec.target
    refs = [r.curves.get(sweep.spec.metric, []) for r in results if r.stage == "main" and r.rule in verdict_rules
            and r.global_batch_size == sweep.spec.reference_batch_size and r.status == "finished"]
    return default_target(refs, sweep.spec.metric)


def _finish(sweep: Sweep, results: list[PointResult], out: Path, report: SweepReport) -> SweepReport:
    spec = sweep.spec
    report.target = _target(sweep, results, {r.rule for r in results if r.stage == "main"})
    for r in results:
        if report.target is not None and r.status == "finished":
            curve = [(p.iteration, p.value) for p in r.curves.get(spec.metric, [])]
            r.steps_to_target = steps_to_target(curve, report.target, spec.metric)
    report.verdicts = verdicts(results, spec.metric, spec.tolerance)
    report.failed = [f"B={r.global_batch_size} {r.rule}" + (f" seed={r.seed}" if r.seed is not None else "")
                     for r in results if r.status == "failed"]
    report.plots = write_plots(results, report.verdicts, spec, report.target, out, warn)
    write_csv(results, out / "results.csv")
    (out / "results.md").write_text(markdown(sweep, results, report))
    (out / "verdict.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def print_verdict(report: SweepReport, metric: str, out: Path) -> None:
    if report.failed:
        warn(f"{len(report.failed)} point(s) failed and are left out of the verdict: {', '.join(report.failed)}; "
             f"see their point.json, then rerun to retry them")
    say(f"\nverdict ({metric}; W = {report.world_size}; {report.wall_seconds:.0f} s):")
    for v in report.verdicts:
        undecided = f"; cannot decide at {v.undecided_at}" if v.undecided_at is not None else ""
        fit = f"; fitted B_crit {num(v.critical_batch_size, 3)}" if v.critical_batch_size is not None else ""
        say(f"  {v.rule}: holds up to B = {num(v.largest_batch_size)} (first outside tolerance: "
            f"{num(v.breaks_at)}{undecided}); B_simple of its B_ref run {num(v.noise_scale, 3)}{fit}")
    say(f"results: {out / 'results.md'}, {out / 'results.csv'}" + "".join(f", {p}" for p in report.plots))
