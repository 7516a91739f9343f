"""`ddp-toolkit report RUN_DIR [RUN_DIR ...]`: plots of one run, or several runs overlaid, and an HTML page.

One run: loss vs iteration (eval loss and epoch ends marked) and vs samples seen, lr and throughput vs
iteration, written into the run directory. Several runs: the same plots with one line per run, labelled by
its global batch and lr rule (from plan.json), written to `--out`. `--html` adds report.html: one
self-contained page (the PNGs embedded as base64) with the plots, the plan and the summary of every run.
"""

from __future__ import annotations

import base64
import html
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ddp_toolkit.reporting import make_console, print_summary, read_metrics
from ddp_toolkit.rundir import atomic_path, atomic_write

__all__ = ["RunData", "load_run", "plot_runs", "report_run", "report_runs", "write_html", "write_plots"]

PLAN_ROWS = ("global_batch_size", "micro_batch_size", "grad_accum_steps", "world_size", "iterations_per_epoch",
             "total_iterations", "lr_rule", "base_lr", "base_batch_size", "scaled_lr", "warmup_iterations",
             "engine", "seed")
"""plan.json fields shown in the HTML page, in this order."""


@dataclass
class RunData:
    """What the report reads from one run directory."""

    run_dir: Path
    train: list[dict]
    evals: list[dict]
    plan: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    label: str = ""


def _read_json(path: Path, what: str) -> dict | None:
    """A JSON object file as a dict, or None when absent or unreadable (a warning says which)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        data = err
    if isinstance(data, dict):
        return data
    warnings.warn(f"ignoring {path}: not a JSON object; {what}", stacklevel=3)
    return None


def load_run(run_dir: Path) -> RunData:
    """metrics.jsonl (required, with training rows), plan.json and summary.json (or one built from metrics)."""
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no training rows")
    summary = _read_json(run_dir / "summary.json", "summarising from metrics.jsonl")
    if summary is None:
        last = train[-1]
        summary = {"iterations": last["iteration"], "epochs": last["epoch"], "samples_seen": last["samples_seen"],
                   "final_loss": last["loss"], "note": "run unfinished: no summary.json"}
    plan = _read_json(run_dir / "plan.json", "labelling the run from metrics.jsonl") or {}
    return RunData(run_dir, train, evals, plan, summary)


def _label_runs(runs: list[RunData]) -> None:
    """`B 64 · linear`; the run directory's name is added where two runs would share a label."""
    for run in runs:
        batch = run.plan.get("global_batch_size", run.train[0].get("global_batch_size"))
        run.label = f"B {batch} · {run.plan.get('lr_rule', 'rule ?')}"
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.run_dir.name})"


def _epoch_boundaries(rows: list[dict]) -> list[int]:
    """Iterations at which a whole epoch ends, from the logged (iteration, epoch) pairs."""
    per_iteration = rows[-1]["epoch"] / rows[-1]["iteration"] if rows[-1]["iteration"] else 0
    if per_iteration <= 0:
        return []
    ipe = round(1 / per_iteration)
    return list(range(ipe, rows[-1]["iteration"] + 1, ipe))


PLOTS = (  # (file, y key, x key, x label)
    ("loss_vs_iteration.png", "loss", "iteration", "iteration"),
    ("loss_vs_samples.png", "loss", "samples_seen", "samples seen (all ranks)"),
    ("lr_vs_iteration.png", "lr", "iteration", "iteration"),
    ("throughput_vs_iteration.png", "samples_per_second", "iteration", "iteration"),
)


def _plot(plt, runs: list[RunData], key: str, x: str, xlabel: str):
    """One figure: `key` against `x` for every run (a single run also gets its eval loss and epoch ends)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    single = len(runs) == 1
    for run in runs:
        rows = [r for r in run.train if isinstance(r.get(key), (int, float))]
        xs = [r[x] for r in rows]
        line, = ax.plot(xs, [r[key] for r in rows], marker="." if len(xs) < 60 else None,
                        label=f"train {key}" if single else run.label)
        if key == "loss" and run.evals:
            ax.plot([r[x] for r in run.evals], [r["eval_loss"] for r in run.evals], "o--", color=line.get_color(),
                    label="eval loss" if single else f"{run.label} eval")
    if single and x == "iteration":
        for b in _epoch_boundaries(runs[0].train):
            ax.axvline(b, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(key)
    if single:
        ax.set_title(f"{key} (global batch {runs[0].train[0]['global_batch_size']}; dotted lines: epoch ends)"
                     if x == "iteration" else f"{key} vs samples seen")
    else:
        ax.set_title(f"{key} vs {xlabel.split(' (')[0]}, {len(runs)} runs")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_runs(runs: list[RunData], out_dir: Path) -> list[Path]:
    """The PNGs of PLOTS for `runs` into out_dir (throughput only when the rows have it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, key, x, xlabel in PLOTS:
        if not any(isinstance(r.get(key), (int, float)) for run in runs for r in run.train):
            continue
        fig = _plot(plt, runs, key, x, xlabel)
        path = out_dir / name
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)
        paths.append(path)
    return paths


def write_plots(run_dir: Path) -> list[Path]:
    """The PNG plots of one run, into its run directory."""
    run = load_run(run_dir)
    _label_runs([run])
    return plot_runs([run], Path(run_dir))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value))
    return html.escape("" if value is None else str(value))


def _table(title: str, runs: list[RunData], keys: list[str], source: str) -> str:
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    body = "".join(f"<tr><th>{html.escape(k.replace('_', ' '))}</th>"
                   + "".join(f"<td>{_cell(getattr(r, source).get(k))}</td>" for r in runs) + "</tr>" for k in keys)
    return f"<h2>{title}</h2>\n<table><tr><th></th>{head}</tr>{body}</table>\n"


def write_html(runs: list[RunData], pngs: list[Path], path: Path) -> Path:
    """One self-contained page: every PNG embedded as base64, the plan and the summary of every run."""
    images = "".join(f'<figure><img alt="{p.stem}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{p.stem.replace("_", " ")}'
                     f"</figcaption></figure>\n" for p in pngs)
    summary_keys = list(dict.fromkeys(k for r in runs for k in r.summary))
    dirs = "".join(f"<li>{html.escape(r.label)}: <code>{html.escape(str(r.run_dir))}</code></li>" for r in runs)
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ddp-toolkit report</title>\n<style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}figure{display:inline-block;margin:4px}"
        "</style></head><body>\n"
        f"<h1>ddp-toolkit report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>\n<ul>{dirs}</ul>\n"
        f"{images}"
        + _table("plan", runs, [k for k in PLAN_ROWS if any(k in r.plan for r in runs)], "plan")
        + _table("summary", runs, summary_keys, "summary")
        + "</body></html>\n")
    atomic_write(path, page)
    return path


def default_out(run_dirs: list[Path]) -> Path:
    """One run: its own directory; several: `report/` in the folder that holds them all."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0])
    return Path(os.path.commonpath([str(Path(d).resolve()) for d in run_dirs])) / "report"


def report_runs(run_dirs: list[Path], out: Path | None = None, html_page: bool = False,
                console: Console | None = None) -> list[Path]:
    """Plots (overlaid when several runs), optionally report.html, and each run's summary on the console."""
    console = console or make_console()
    runs = [load_run(d) for d in run_dirs]
    _label_runs(runs)
    out = Path(out) if out is not None else default_out(run_dirs)
    paths = plot_runs(runs, out)
    if html_page:
        paths.append(write_html(runs, paths, out / "report.html"))
    for run in runs:
        if len(runs) > 1:
            console.print(f"[bold]{escape(run.label)}[/bold]: {escape(str(run.run_dir))}")
        print_summary(run.summary, console)
    for path in paths:
        console.print(f"wrote {path}")
    return paths


def report_run(run_dir: Path, console: Console | None = None) -> list[Path]:
    """Write the plots of one run and print its summary again (from summary.json, or from the metrics)."""
    return report_runs([Path(run_dir)], console=console)
