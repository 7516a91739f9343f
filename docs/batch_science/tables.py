"""The tables of docs/batch_science.md that results.md does not give, from a finished sweep of
configs/sweeps/batch_science_digits.yaml (nothing is trained):

    python docs/batch_science/tables.py runs/sweeps/batch_science_digits

1. Steps to the target per B and rule with their 95 % t-intervals, and the ratio to the next smaller B.
2. B_crit fitted per seed (mean ± 95 % t-interval over the seeds) next to B_simple measured in the B_ref runs when
   they reach the target and at their end, for the sweep's target and a few others (same runs, other targets).
3. The ramp rule against the fixed-batch rule with the same lr rule, at each B the ramp reaches: final metric, final
   train loss, iterations, steps and samples to the target.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ddp_toolkit.reporting import read_metrics
from ddp_toolkit.sweep.analysis import steps_to_target
from ddp_toolkit.sweep.spec import load_sweep
from ddp_toolkit.sweep.stats import fit_critical_batch, mean_interval

SWEEP = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "batch_science_digits.yaml"
OTHER_TARGETS = (0.9, 0.97, 0.98)


def cell(values: list[float], digits: int = 3) -> str:
    """mean ± half-width of the 95 % t-interval; – when a run has no value."""
    if not values or any(v is None for v in values):
        return "–"
    i = mean_interval(values)
    mean = f"{i.mean:,.0f}" if abs(i.mean) >= 1000 else f"{i.mean:.{digits}g}"
    if i.half_width is None:
        return mean
    return f"{mean} ± " + (f"{i.half_width:,.0f}" if i.half_width >= 100 else f"{i.half_width:.2g}")


def hit(evals: list[dict], target: float, metric: str) -> dict | None:
    """The first eval row at the target (the sweep's steps-to-target), or None."""
    step = steps_to_target([(e["iteration"], e.get(metric)) for e in evals], target, metric)
    return next((e for e in evals if e["iteration"] == step), None)


def noise_at(train: list[dict], iteration: int) -> float | None:
    """The logged B_simple at the first train row from `iteration` on."""
    return next((t["grad_noise_scale"] for t in train if t["iteration"] >= iteration and t.get("grad_noise_scale")),
                None)


def steps_table(runs: dict, spec, rules: list[str]) -> None:
    """Steps to the target per B and rule (mean ± interval), and S(B) / S(B/2) of the means: 0.5 is perfect
    scaling, 1 no benefit."""
    print("| B | " + " | ".join(f"{r}: steps | ratio to B/2" for r in rules) + " |\n|---|"
          + "---|---|" * len(rules))
    last: dict[str, float | None] = {}
    for B in spec.batch_sizes:
        cells = []
        for rule in rules:
            steps = [h and h["iteration"] for h in (hit(ev, spec.target, spec.metric) for _, ev, _ in runs[(rule, B)])]
            mean = None if None in steps else mean_interval(steps).mean
            ratio = f"{mean / last[rule]:.2f}" if mean and last.get(rule) else "–"
            cells += [cell(steps), ratio]
            last[rule] = mean
        print(f"| {B} | " + " | ".join(cells) + " |")
    print()


def critical_table(runs: dict, spec, rules: list[str]) -> None:
    """B_crit of S(B) = S_min·(1 + B_crit/B) fitted to the mean steps (as results.md) and to each seed's steps."""
    print("| target | rule | B_crit, fit on the mean steps | B_crit per seed "
          "| B_simple of the B_ref runs at the target |"
          "\n|---|---|---|---|---|")
    for target in (spec.target, *OTHER_TARGETS):
        for rule in rules:
            by_b = {B: [hit(ev, target, spec.metric) for _, ev, _ in rs] for (r, B), rs in runs.items() if r == rule}
            sizes = [B for B in sorted(by_b) if all(by_b[B])]
            mean = fit_critical_batch(sizes, [mean_interval([h["iteration"] for h in by_b[B]]).mean for B in sizes])
            seeds = [fit_critical_batch(sizes, [by_b[B][i]["iteration"] for B in sizes])
                     for i in range(len(by_b[sizes[0]]))]
            ref = runs[(rule, spec.reference_batch_size)]
            at_target = [noise_at(train, h["iteration"]) for (train, _, _), h in zip(ref, by_b[sizes[0]], strict=True)]
            print(f"| {target:g} | {rule} | {mean.critical_batch_size:.3g} (B = {sizes[0]} … {sizes[-1]}) | "
                  f"{cell([f and f.critical_batch_size for f in seeds])} | {cell(at_target)} |")
    ends = [row["grad_noise_scale"] for _, _, row in runs[(rules[0], spec.reference_batch_size)]]
    print(f"\nB_simple of the B_ref runs at their end: {cell(ends)} ({', '.join(f'{v:.0f}' for v in ends)})")


def ramp_table(runs: dict, spec, fixed: str, ramp) -> None:
    """The ramp rule against the fixed-batch rule at every B the ramp grows to, on the same sample budget."""
    print(f"\n| B | rule | {spec.metric} | final train loss | iterations | steps to target | samples to target |"
          "\n|---|---|---|---|---|---|---|")
    for B in (b for b in spec.batch_sizes if b > ramp.batch_ramp.start):
        for rule in (fixed, ramp.name):
            rs = runs[(rule, B)]
            hits = [hit(ev, spec.target, spec.metric) for _, ev, _ in rs]
            print(f"| {B} | {rule} | {cell([row[spec.metric] for *_, row in rs], 4)} | "
                  f"{cell([row['final_train_loss'] for *_, row in rs], 2)} | {rs[0][2]['iterations']:,.0f} | "
                  f"{cell([h and h['iteration'] for h in hits])} | {cell([h and h['samples_seen'] for h in hits])} |")


def main(out: Path) -> None:
    spec = load_sweep(SWEEP).spec
    runs: dict = {}
    with open(out / "results.csv") as fh:
        for row in csv.DictReader(fh):
            if row["stage"] == "main" and row["status"] == "finished":
                row = {k: float(v) if k in ("eval_accuracy", "final_train_loss", "grad_noise_scale", "iterations")
                       and v else v for k, v in row.items()}
                train, evals = read_metrics(Path(row["run_dir"]))
                runs.setdefault((row["rule"], int(row["global_batch_size"])), []).append((train, evals, row))
    ramp = next(r for r in spec.rules if r.batch_ramp is not None)
    fixed = [r.name for r in spec.rules if r.batch_ramp is None]
    steps_table(runs, spec, fixed)
    critical_table(runs, spec, fixed)
    ramp_table(runs, spec, next(r.name for r in spec.rules if r.batch_ramp is None
                                 and r.lr_scaling == ramp.lr_scaling), ramp)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sweeps/batch_science_digits"))
