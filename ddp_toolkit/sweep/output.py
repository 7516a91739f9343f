"""results.csv (one row per run) and results.md (setup, verdict, tables, plots) of a sweep."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddp_toolkit.sweep.analysis import Group, Verdict, groups
from ddp_toolkit.sweep.results import COLUMNS, PointResult
from ddp_toolkit.sweep.spec import Sweep, higher_is_better
from ddp_toolkit.sweep.stats import Interval

if TYPE_CHECKING:
    from ddp_toolkit.sweep.run import SweepReport

__all__ = ["write_csv", "markdown", "num"]


def write_csv(results: list[PointResult], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow(result.csv_row())


def num(value: Any, digits: int = 4) -> str:
    """A table cell: – for None, thousands separators for counts, `digits` significant digits otherwise."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if 1000 <= abs(value) < 1e6 else f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _interval(value: Interval | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if value.half_width is None:
        return num(value.mean, digits)
    return f"{num(value.mean, digits)} ± {value.half_width:.2g}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def _mode_text(world_size: int) -> str:
    if world_size == 1:
        how = ("one process per point, gradient accumulation to B (W = 1, k = B / b): the trainer's "
               "(W, k)-equivalence makes this the same run as W processes with k = B / (b·W) (same global "
               "batches, same mean gradient per step, up to float summation order)")
    else:
        how = (f"{world_size} processes per point under torch.distributed.run (k = B / (b·W)); by the trainer's "
               f"(W, k)-equivalence a single process with accumulation would train the same run")
    return f"Mode: {how}."


def _seeds_text(sweep: Sweep) -> str:
    seeds = sweep.seeds
    if len(seeds) < 2:
        return f"One run per point (seed {seeds[0]}): values without intervals."
    return (f"Every point is trained with seeds {', '.join(map(str, seeds))}: values are means ± the half-width of "
            f"the 95 % Student-t interval over the seeds. A rule holds at B when the 95 % interval of the "
            f"seed-paired difference to its B_ref point lies within the tolerance, breaks when it lies wholly "
            f"outside, and the sweep cannot decide when it straddles the tolerance.")


def _target_text(sweep: Sweep, report: SweepReport) -> str:
    spec, relation = sweep.spec, "≥" if higher_is_better(sweep.spec.metric) else "≤"
    source = ("given in the sweep file" if spec.target is not None else
              "by default what the worst rule's B_ref run reaches after half of its sample budget")
    return (f"Steps-to-target: the first evaluated iteration (about {spec.evals} evaluations per run) at which "
            f"`{spec.metric}` {relation} {num(report.target)} ({source}); missing where a run never reaches it "
            f"within its budget. B_crit is the fit of S(B) = S_min·(1 + B_crit/B) (McCandlish et al. 2018) by "
            f"linear least squares in 1/B (weights 1/S²: relative errors) over the batch sizes that reached the "
            f"target (at least 3).")


def _verdict_table(verdicts: list[Verdict], metric: str, seeds: int) -> list[str]:
    header = ["rule", f"{metric} at B_ref", "holds up to B", "first B outside tolerance"]
    header += ["first B undecided"] if seeds > 1 else []
    header += ["B within tolerance", "B_simple (B_ref run, end)", "B_crit (fit)", "S_min (fit)"]
    lines = []
    for v in verdicts:
        cells = [v.rule, num(v.reference_value), num(v.largest_batch_size), num(v.breaks_at)]
        cells += [num(v.undecided_at)] if seeds > 1 else []
        cells += [", ".join(str(b) for b in v.within_tolerance) or "–", num(v.noise_scale, 3),
                  num(v.critical_batch_size, 3), num(v.min_steps, 3)]
        lines.append(cells)
    return _table(header, lines)


def _grid_tables(sweep: Sweep, main: list[Group]) -> list[str]:
    """The metric (and the final train loss) by global batch × rule."""
    metric, rules = sweep.spec.metric, list(dict.fromkeys(g.rule for g in main))
    tables = [(metric, metric)]
    if metric != "train_loss":
        tables.append(("final train loss (mean over the last 5 % of samples)", "train_loss"))
    by = {(g.rule, g.global_batch_size): g for g in main}
    lines: list[str] = []
    for title, key in tables:
        lines += ["", f"## {title}: global batch × rule", ""]
        lines += _table(["B"] + rules, [[str(B)] + [_group_cell(by.get((rule, B)), key) for rule in rules]
                                         for B in sweep.spec.batch_sizes])
    return lines


def _group_cell(group: Group | None, key: str) -> str:
    if group is None:
        return "–"
    if group.diverged:
        return "diverged"
    return _interval(group.interval(key))


def _point_cells(r: PointResult) -> list[str]:
    shape = f"{r.world_size} × {num(r.grad_accum_steps)} × {r.micro_batch_size}"
    return [r.rule, str(r.global_batch_size), num(r.seed), shape, num(r.scaled_lr), num(r.iterations),
            num(r.final_train_loss), num(r.eval_loss), num(r.eval_accuracy), num(r.steps_to_target),
            num(r.grad_noise_scale, 3), num(r.wall_seconds, 3), r.status]


def markdown(sweep: Sweep, results: list[PointResult], report: SweepReport) -> str:
    """results.md: setup, verdict, the metric by batch size × rule, all points, the lr grid, the plots."""
    spec, metric = sweep.spec, sweep.spec.metric
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Every point trains on the same budget of {spec.samples:,} samples: iterations = ceil(samples / B) "
             f"full global batches. B_ref = {spec.reference_batch_size}; metric `{metric}`, tolerance "
             f"{spec.tolerance:g}. {_mode_text(report.world_size)} {_seeds_text(sweep)}", "",
             f"Base lr: {report.base_lr_text}. Sweep wall time {report.wall_seconds:.0f} s ({report.trained} runs "
             f"trained, {report.skipped} skipped as finished).", "", _target_text(sweep, report), "",
             "## Verdict", ""]
    lines += _verdict_table(report.verdicts, metric, len(sweep.seeds))
    lines += _grid_tables(sweep, groups(results))
    lines += ["", "## All points", ""]
    lines += _table(["rule", "B", "seed", "W × k × b", "lr", "iterations", "final train loss", "eval loss",
                     "eval accuracy", "steps to target", "B_simple", "wall s", "status"],
                    [_point_cells(r) for r in results if r.stage == "main"])
    grid = [r for r in results if r.stage == "grid"]
    if grid:
        lines += ["", f"## Base-lr grid at B_ref = {spec.reference_batch_size}", ""]
        lines += _table(["lr", "seed", metric, "final train loss", "status"],
                        [[num(r.base_lr), num(r.seed), num(r.value(metric)), num(r.final_train_loss), r.status]
                         for r in grid])
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in report.plots]
    return "\n".join(lines) + "\n"
