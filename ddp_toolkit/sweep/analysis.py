"""The verdict: per rule, the largest global batch whose metric stays within a tolerance of the rule's
smallest-batch point, steps-to-target, and the critical batch size fitted to them.

With one seed a point is compared by its value; with repeated seeds by the 95 % t-interval of the
seed-paired difference to the reference point: inside the tolerance the rule holds, wholly outside it
breaks, straddling it the sweep cannot decide (more seeds would).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ddp_toolkit.errors import RunError
from ddp_toolkit.sweep.results import CurvePoint, PointResult
from ddp_toolkit.sweep.spec import METRICS, higher_is_better
from ddp_toolkit.sweep.stats import Interval, fit_critical_batch, mean_interval

__all__ = ["SweepError", "Group", "Verdict", "groups", "within", "compare", "verdicts", "default_target",
           "steps_to_target", "best_lr", "better"]

Decision = Literal["holds", "breaks", "undecided"]


class SweepError(RunError):
    """The sweep cannot go on (e.g. every lr of the grid diverged); one line, exit code 1."""


@dataclass
class Group:
    """The runs of one (stage, rule, B) point over its seeds."""

    stage: str
    rule: str
    global_batch_size: int
    runs: list[PointResult]

    @property
    def diverged(self) -> bool:
        return any(r.status == "diverged" for r in self.runs)

    @property
    def judged(self) -> list[PointResult]:
        """The runs that say something about the rule: failed runs (the run broke, not the rule) are left out."""
        return [r for r in self.runs if r.status != "failed"]

    def interval(self, attribute: str) -> Interval | None:
        """Mean and t-interval of a metric or column over the judged runs; None if any has no value."""
        values = [r.value(attribute) if attribute in METRICS else getattr(r, attribute) for r in self.judged]
        if not values or any(v is None or not math.isfinite(v) for v in values):
            return None
        return mean_interval(values)


def groups(results: Iterable[PointResult], stage: str = "main") -> list[Group]:
    """Runs of one stage grouped by (rule, B), in order of first appearance."""
    out: dict[tuple[str, int], Group] = {}
    for r in results:
        if r.stage == stage:
            key = (r.rule, r.global_batch_size)
            out.setdefault(key, Group(stage, r.rule, r.global_batch_size, [])).runs.append(r)
    return list(out.values())


def better(value: float, other: float, metric: str) -> bool:
    """Strictly better in the metric's direction."""
    return value > other if higher_is_better(metric) else value < other


def within(value: float | None, reference: float | None, metric: str, tolerance: float) -> bool:
    """Is `value` no worse than `reference` by more than `tolerance` (in the metric's direction)?"""
    if value is None or reference is None:
        return False
    return value >= reference - tolerance if higher_is_better(metric) else value <= reference + tolerance


def compare(group: Group, reference: Group, metric: str, tolerance: float) -> Decision:
    """Does the rule hold at this group's B? Diverged runs (here or at the reference) break it."""
    if group.diverged or reference.diverged:
        return "breaks"
    ref = {r.seed: r.value(metric) for r in reference.judged}
    pairs = [(r.value(metric), ref[r.seed]) for r in group.judged if r.seed in ref]
    if any(v is None or r is None for v, r in pairs):
        return "breaks"  # no value (e.g. no eval set at the end) is no evidence that the rule holds
    if not pairs:
        return "undecided"  # no seed finished both here and at the reference
    if len(pairs) == 1:
        return "holds" if within(*pairs[0], metric, tolerance) else "breaks"
    sign = 1.0 if higher_is_better(metric) else -1.0
    gain = mean_interval([sign * (v - r) for v, r in pairs])  # > 0: better than the reference
    if gain.low >= -tolerance:
        return "holds"
    return "breaks" if gain.high < -tolerance else "undecided"


@dataclass
class Verdict:
    """One rule's verdict; `largest_batch_size` is the largest B up to which every point holds."""

    rule: str
    reference_batch_size: int
    reference_value: float | None
    largest_batch_size: int | None
    breaks_at: int | None
    """The first B outside the tolerance (None: none before the end or an undecided B)."""
    undecided_at: int | None
    """The first B whose interval straddles the tolerance (repeated seeds only)."""
    within_tolerance: list[int] = field(default_factory=list)
    noise_scale: float | None = None
    """B_simple measured in the reference run (mean over its seeds)."""
    critical_batch_size: float | None = None
    """B_crit of S(B) = S_min·(1 + B_crit/B) fitted to steps-to-target (None: fewer than 3 points reached it)."""
    min_steps: float | None = None
    seeds: int = 1


def verdicts(results: list[PointResult], metric: str, tolerance: float) -> list[Verdict]:
    """Per rule: the reference (its smallest-B point), the largest B up to which every point holds, the first
    B that breaks or cannot be decided, and the noise scale measured in the reference run.

    A diverged point is outside the tolerance; a failed one (the run itself broke) is left out, not judged.
    """
    by_rule: dict[str, list[Group]] = {}
    for g in groups(results):
        if g.judged:
            by_rule.setdefault(g.rule, []).append(g)
    return [_verdict(sorted(gs, key=lambda g: g.global_batch_size), metric, tolerance) for gs in by_rule.values()]


def _verdict(pts: list[Group], metric: str, tolerance: float) -> Verdict:
    ref = pts[0]
    ref_value, noise = ref.interval(metric), ref.interval("grad_noise_scale")
    v = Verdict(pts[0].rule, ref.global_batch_size, None if ref.diverged or ref_value is None else ref_value.mean,
                None, None, None, noise_scale=noise.mean if noise else None, seeds=len(ref.judged))
    stopped = False
    for g in pts:
        decision = compare(g, ref, metric, tolerance)
        if decision == "holds":
            v.within_tolerance.append(g.global_batch_size)
            v.largest_batch_size = v.largest_batch_size if stopped else g.global_batch_size
        elif not stopped:
            stopped = True
            if decision == "breaks":
                v.breaks_at = g.global_batch_size
            else:
                v.undecided_at = g.global_batch_size
    steps = [(g.global_batch_size, s.mean) for g in pts if not g.diverged and (s := g.interval("steps_to_target"))]
    fit = fit_critical_batch([b for b, _ in steps], [s for _, s in steps]) if steps else None
    if fit is not None:
        v.critical_batch_size, v.min_steps = fit.critical_batch_size, fit.min_steps
    return v


def default_target(reference_curves: list[list[CurvePoint]], metric: str, fraction: float = 0.5) -> float | None:
    """What the reference runs reach after `fraction` of their budget (the worst of them): B_ref then needs that
    share of its steps, perfect scaling keeps the share at every B, and beyond it larger batches need more."""
    values = []
    for curve in reference_curves:
        if curve:
            end = curve[-1].samples_seen
            values.append(next(p.value for p in curve if p.samples_seen >= fraction * end))
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return min(values) if higher_is_better(metric) else max(values)


def steps_to_target(curve: list[tuple[int, float | None]], target: float, metric: str) -> int | None:
    """First iteration whose metric reaches the target (None if never): the y of Shallue et al.'s plots."""
    higher = higher_is_better(metric)
    for iteration, value in curve:
        if value is not None and math.isfinite(value) and (value >= target if higher else value <= target):
            return iteration
    return None


def best_lr(grid: list[PointResult], metric: str) -> tuple[float, str]:
    """The grid lr with the best final metric, mean over seeds (the smaller lr on a tie), and a sentence."""
    best: tuple[float, float] | None = None
    for g in sorted(groups(grid, "grid"), key=lambda g: g.runs[0].base_lr):
        value = None if g.diverged else g.interval(metric)
        if value is not None and (best is None or better(value.mean, best[1], metric)):
            best = (g.runs[0].base_lr, value.mean)
    if best is None:
        where = Path(grid[0].run_dir).parent if grid else "the grid"
        raise SweepError(f"every lr of the grid failed or diverged at B_ref; see {where}")
    tried = ", ".join(f"{lr:g}" for lr in dict.fromkeys(r.base_lr for r in grid))
    return best[0], f"{best[0]:g}, best {metric} ({best[1]:.4g}) of the grid [{tried}] at B_ref"
