"""The sweep's three PNGs: final metric vs batch, train loss vs samples, steps to target vs batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ddp_toolkit.sweep.analysis import Verdict, groups
from ddp_toolkit.sweep.output import num
from ddp_toolkit.sweep.points import iterations_for_budget
from ddp_toolkit.sweep.results import PointResult
from ddp_toolkit.sweep.spec import SweepSpec

__all__ = ["write_plots"]


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _mean(group, key: str) -> tuple[float, float]:
    """(mean, half-width) of a group's value for error bars; NaN where there is none."""
    value = None if group.diverged else group.interval(key)
    if value is None:
        return float("nan"), 0.0
    return value.mean, value.half_width or 0.0


def plot_metric_vs_batch(results: list[PointResult], verdicts: list[Verdict], spec: SweepSpec, path: Path) -> None:
    """Final metric and final train loss vs global batch, one line per rule (mean ± 95 % interval over seeds),
    log-2 x; the tolerance band and the measured B_simple of each rule's reference run."""
    main = groups(results)
    fig, (ax_m, ax_l) = _figure(2)
    for v in verdicts:
        pts = sorted((g for g in main if g.rule == v.rule), key=lambda g: g.global_batch_size)
        xs = [g.global_batch_size for g in pts]
        ys, es = zip(*(_mean(g, spec.metric) for g in pts), strict=True)
        line = ax_m.errorbar(xs, ys, yerr=es, fmt="o-", capsize=3, label=v.rule).lines[0]
        ls, le = zip(*(_mean(g, "train_loss") for g in pts), strict=True)
        ax_l.errorbar(xs, ls, yerr=le, fmt="o-", capsize=3, color=line.get_color(), label=v.rule)
    for i, ref in enumerate(dict.fromkeys(v.reference_value for v in verdicts if v.reference_value)):
        ax_m.axhspan(ref - spec.tolerance, ref + spec.tolerance, color="0.85", zorder=0,
                     label=None if i else f"B_ref ± tolerance {spec.tolerance:g}")
    for i, noise in enumerate(dict.fromkeys(v.noise_scale for v in verdicts if v.noise_scale)):
        for ax in (ax_m, ax_l):
            ax.axvline(noise, color="0.3", ls=":", lw=1.2, label=None if i else "B_simple (B_ref run)")
    ax_m.set(xlabel="global batch size B", ylabel=spec.metric, title=f"final {spec.metric}")
    ax_l.set(xlabel="global batch size B", ylabel="train loss", title="final train loss")
    _log_y(ax_l)
    for ax in (ax_m, ax_l):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"same budget of {spec.samples:,} samples per point")
    fig.savefig(path, dpi=110)


def plot_loss_vs_samples(results: list[PointResult], spec: SweepSpec, path: Path) -> None:
    """Train loss (smoothed) vs samples seen, one panel per rule, one line per global batch size (first seed)."""
    from matplotlib import colormaps

    main = groups(results)
    rules = list(dict.fromkeys(g.rule for g in main))
    fig, axes = _figure(len(rules), width=4.5)
    cmap, sizes = colormaps["viridis"], spec.batch_sizes
    for ax, rule in zip(axes, rules, strict=True):
        for g in sorted((g for g in main if g.rule == rule), key=lambda g: g.global_batch_size):
            curve = g.runs[0].curves.get("train_loss", [])
            if not curve:
                continue
            color = cmap(sizes.index(g.global_batch_size) / max(len(sizes) - 1, 1))
            ax.plot([p.samples_seen for p in curve], _smooth([p.value for p in curve]), color=color, lw=1.2,
                    label=f"B={g.global_batch_size}")
        ax.set(xlabel="samples seen", ylabel="train loss (smoothed)", title=rule)
        _log_y(ax)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plot_steps_to_target(results: list[PointResult], verdicts: list[Verdict], spec: SweepSpec,
                         target: float | None, path: Path) -> None:
    """Iterations to reach the target metric vs global batch (log-log), in the style of Shallue et al. 2018:
    slope −1 is perfect scaling (dashed, from B_ref); the dotted line is the budget ceil(samples / B); thin
    lines are the fitted S(B) = S_min·(1 + B_crit/B)."""
    fig, (ax,) = _figure(1, width=6.5)
    Bs = spec.batch_sizes
    ax.plot(Bs, [iterations_for_budget(spec.samples, B) for B in Bs], ":", color="0.5", label="budget (all steps)")
    fits = {v.rule: v for v in verdicts}
    first = None
    for rule in dict.fromkeys(g.rule for g in groups(results)):
        pts = [(g.global_batch_size, s) for g in groups(results) if g.rule == rule and not g.diverged
               and (s := g.interval("steps_to_target"))]
        if not pts:
            continue
        pts.sort(key=lambda p: p[0])
        bar = ax.errorbar([b for b, _ in pts], [s.mean for _, s in pts], yerr=[s.half_width or 0.0 for _, s in pts],
                          fmt="o-", capsize=3, label=rule)
        first = first or (pts[0][0], pts[0][1].mean)
        v = fits.get(rule)
        if v is not None and v.critical_batch_size is not None:
            ax.plot(Bs, [v.min_steps * (1 + v.critical_batch_size / B) for B in Bs], "-", lw=0.8, alpha=0.6,
                    color=bar.lines[0].get_color(), label=f"{rule}: fit, B_crit ≈ {v.critical_batch_size:.3g}")
    if first is not None:
        B0, s0 = first
        ax.plot(Bs, [s0 * B0 / B for B in Bs], "--", color="0.3", lw=1, label="perfect scaling")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="global batch size B", ylabel="iterations to reach target",
           title=f"steps to {spec.metric} {num(target)} (missing: not reached)")
    _log_y(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _log_y(ax) -> None:
    """Log y-axis when the plotted data allow it (all-diverged runs leave nothing positive and finite)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if any(math.isfinite(y) and y > 0 for y in ys):
        ax.set_yscale("log")


def _smooth(values: list[float | None], fraction: float = 0.03) -> list[float]:
    """Trailing moving average over ~3 % of the points (small batches' losses are noisy)."""
    values = [float("nan") if v is None else v for v in values]
    width = max(1, int(len(values) * fraction))
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def write_plots(results: list[PointResult], verdicts: list[Verdict], spec: SweepSpec, target: float | None,
                out: Path, warn: Callable[[str], None]) -> list[Path]:
    """The three PNGs (matplotlib, no display needed); skipped with a warning when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warn("matplotlib is not installed (pip install 'ddp_toolkit[plots]'): no plots")
        return []
    plots = {"metric_vs_batch.png": lambda path: plot_metric_vs_batch(results, verdicts, spec, path),
             "loss_vs_samples.png": lambda path: plot_loss_vs_samples(results, spec, path),
             "steps_to_target.png": lambda path: plot_steps_to_target(results, verdicts, spec, target, path)}
    written = []
    for name, plot in plots.items():
        try:
            plot(out / name)
            written.append(out / name)
        except Exception as err:  # a plot never costs the results: csv and md are written regardless
            warn(f"plot {name} failed: {type(err).__name__}: {err}")
    return written
