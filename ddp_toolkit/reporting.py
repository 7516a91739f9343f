"""Rank-0 reports: the plan table, plain-sentence explanations, live progress, JSONL, wandb, summary."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ddp_toolkit import plan_report
from ddp_toolkit.errors import InputError
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.rundir import append_line, atomic_path, atomic_write, describe_os_error


def make_console() -> Console:
    """A console that wraps at 120 columns in log files instead of rich's 80."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)
    return console


def _fmt(x: float) -> str:
    """Numbers as people read them: integers plain, floats to 6 significant digits."""
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.6g}"
    return f"{int(x):,}" if isinstance(x, (int, float)) else str(x)


# ---- live reports during training (rank 0 only) ------------------------------------------------------------
class Reporter:
    """Rank-0 sinks: plan.json, metrics.jsonl, a live console view, wandb; all no-ops on other ranks."""

    def __init__(self, cfg, env, plan: BatchPlan, enabled: bool = True, console: Console | None = None) -> None:
        self.cfg, self.env, self.plan, self.enabled = cfg, env, plan, enabled
        self.run_dir = Path(cfg.run_dir)
        self.console = console or make_console()
        self.last_metrics: dict = {}
        self.last_loss: float | None = None
        self._bar = None
        self._wandb = None
        self._live = None

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop metrics rows past the checkpoint, so no iteration appears twice.

        Lines an earlier crash tore (or that are not JSON objects) are cut too, named in one warning; the file
        is rewritten by atomic replace, so nothing a previous run left can block this one.
        """
        if not self.enabled or not self.metrics_path.exists():
            return
        rows, problem = parse_metrics(self.metrics_path)
        if problem:
            self.warn(problem)
        keep = [json.dumps(r) for r in rows if r.get("iteration", 0) <= iteration]
        atomic_write(self.metrics_path, "".join(line + "\n" for line in keep))

    def start(self, info: dict, progress, total_iterations: int) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.info, self.total = info, total_iterations
        atomic_write(self.run_dir / "plan.json", json.dumps(info, indent=2) + "\n")
        if self.cfg.report.console:
            plan_report.print_plan_table(self.plan, info, console=self.console)
            if "resumed_from" in info:
                self.console.print(f"resumed from checkpoint {info['resumed_from']} at iteration "
                                   f"{progress.iteration}")
            self._live = LiveProgress(self.console, self.plan, total_iterations, progress.iteration)
        if self.cfg.report.wandb:
            self._wandb = WandbSink.open(self.cfg, info, self.warn)

    def _write(self, row: dict) -> None:
        if self.cfg.report.jsonl:
            append_line(self.metrics_path, json.dumps(row))
        if self._wandb is not None:
            self._wandb.log(row)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.last_metrics, self.last_loss = metrics, metrics["loss"]
        self._write({"kind": "train", **metrics})
        if self._live is not None:
            self._live.update(metrics)

    def log_eval(self, result: dict) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", **result})
        if self._live is not None:
            self._live.note(f"eval at iteration {result['iteration']}: loss {result['eval_loss']:.4f}, "
                            f"accuracy {result['eval_accuracy']:.4f} on {result['eval_samples']} samples")

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.close()
            self._live = None
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.cfg.report.console:
            print_summary(summary, self.console)
        if self._wandb is not None:
            self._wandb.summary(summary)

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


def print_summary(summary: dict, console: Console | None = None) -> None:
    """The end-of-run summary as a two-column table."""
    console = console or make_console()
    table = Table(title="summary", show_header=False, box=None)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), _fmt(value) if isinstance(value, (int, float)) else str(value))
    console.print(table)


class LiveProgress:
    """A rich progress bar on a terminal; plain periodic lines (no control characters) otherwise."""

    def __init__(self, console: Console, plan: BatchPlan, total: int, start: int) -> None:
        self.console, self.plan, self.total = console, plan, total
        self.epochs_total = max(1, math.ceil(plan.epochs_for(total)))
        self._bar = None
        if console.is_terminal:
            self._bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(),
                                 TextColumn("it {task.completed}/{task.total} · in epoch {task.fields[in_epoch]}"),
                                 TextColumn("{task.fields[rate]} samples/s · loss {task.fields[loss]} · "
                                            "lr {task.fields[lr]}"),
                                 TimeRemainingColumn(), console=console, transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, epoch=self._epoch_text(start),
                                            in_epoch="-", rate="-", loss="-", lr="-")
            self._bar.start()

    def _epoch_text(self, iteration: int) -> str:
        current = min(iteration // self.plan.iterations_per_epoch + 1, self.epochs_total)
        return f"{current}/{self.epochs_total}"

    def update(self, m: dict) -> None:
        it, ipe = m["iteration"], self.plan.iterations_per_epoch
        in_epoch = (it - 1) % ipe + 1
        epoch = f"{(it - 1) // ipe + 1}/{self.epochs_total}"
        rate = f"{m['samples_per_second']:,.0f}" if m.get("samples_per_second") else "-"
        if self._bar is not None:
            self._bar.update(self._task, completed=it, epoch=epoch, in_epoch=f"{in_epoch}/{ipe}", rate=rate,
                             loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.4g}")
        else:
            self.console.print(f"epoch {epoch} · iteration {it}/{self.total} (in epoch {in_epoch}/{ipe}) · "
                               f"samples_seen {m['samples_seen']} · loss {m['loss']:.4f} · lr {m['lr']:.4g} · "
                               f"{rate} samples/s", soft_wrap=True)

    def note(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class WandbSink:
    """Weights & Biases logging that never blocks training: any failure disables it with one warning."""

    def __init__(self, run, warn) -> None:
        self.run, self.warn = run, warn

    @classmethod
    def open(cls, cfg, info: dict, warn) -> WandbSink | None:
        try:
            import wandb

            run = wandb.init(project=cfg.report.wandb_project, name=cfg.report.run_name, tags=cfg.report.tags,
                             dir=str(Path(cfg.run_dir)), config={"config": cfg.model_dump(), "plan": info},
                             settings=wandb.Settings(init_timeout=60, silent=True))
            return cls(run, warn)
        except Exception as err:  # network, auth, missing package: training goes on
            warn(f"wandb disabled: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            return None

    def log(self, row: dict) -> None:
        if self.run is None:
            return
        try:
            data = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}
            self.run.log(data, step=row["iteration"])
        except Exception as err:
            self.warn(f"wandb log failed ({type(err).__name__}); continuing without it")
            self.run = None

    def summary(self, summary: dict) -> None:
        if self.run is not None:
            for key, value in summary.items():
                self.run.summary[key] = value

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as err:
                self.warn(f"wandb finish failed ({type(err).__name__})")


def write_final_weights(run_dir: Path, model_state: dict) -> Path:
    """run_dir/final/model.safetensors by atomic replace; a disk error is one RunError line naming the file."""
    from safetensors.torch import save_file

    final = Path(run_dir) / "final"
    final.mkdir(parents=True, exist_ok=True)
    with atomic_path(final / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp)
    return final / "model.safetensors"


# ---- after the run: `ddp-toolkit report RUN_DIR` --------------------------------------------------------------
def _metrics_row(line: str) -> dict | None:
    """The row a metrics line holds, or None for a torn line, a non-object or a non-numeric iteration."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("iteration", 0), (int, float)):
        return None
    return row


def parse_metrics(path: Path) -> tuple[list[dict], str | None]:
    """(rows, None) or (readable rows, one sentence naming the unreadable lines that were left out)."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError as err:
        raise InputError(f"cannot read {path}: {describe_os_error(err)}") from None
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        row = _metrics_row(line) if line.strip() else {}
        if row is None:
            bad.append(number)
        elif row:
            rows.append(row)
    if not bad:
        return rows, None
    where = f"line {bad[0]}" if len(bad) == 1 else f"{len(bad)} lines ({', '.join(map(str, bad[:5]))}" + \
        (", ...)" if len(bad) > 5 else ")")
    return rows, f"{path}: cut {where} that is not a JSON object (torn by an earlier crash or a full disk?)"


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of run_dir/metrics.jsonl; torn lines are left out with one warning."""
    rows, problem = parse_metrics(Path(run_dir) / "metrics.jsonl")
    if problem:
        warnings.warn(problem.replace(": cut ", ": ignoring ", 1), stacklevel=2)
    return [r for r in rows if r.get("kind", "train") == "train"], [r for r in rows if r.get("kind") == "eval"]


def write_plots(run_dir: Path) -> list[Path]:
    """PNG plots of a run: loss vs iteration and vs samples seen, lr vs iteration (epoch boundaries marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    if not train:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} has no training rows")
    it = [r["iteration"] for r in train]
    boundaries = _epoch_boundaries(train)
    out = []
    specs = [("loss_vs_iteration.png", it, "loss", "iteration"),
             ("loss_vs_samples.png", [r["samples_seen"] for r in train], "loss", "samples seen (all ranks)"),
             ("lr_vs_iteration.png", it, "lr", "iteration")]
    for name, xs, key, xlabel in specs:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(xs, [r[key] for r in train], marker="." if len(xs) < 60 else None, label=f"train {key}")
        if key == "loss" and evals:
            ex = [r["iteration"] if xlabel == "iteration" else r["samples_seen"] for r in evals]
            ax.plot(ex, [r["eval_loss"] for r in evals], "o--", label="eval loss")
        if xlabel == "iteration":
            for b in boundaries:
                ax.axvline(b, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.set_title(f"{key} (global batch {train[0]['global_batch_size']}; dotted lines: epoch ends)"
                     if xlabel == "iteration" else f"{key} vs samples seen")
        ax.legend()
        fig.tight_layout()
        path = Path(run_dir) / name
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)
        out.append(path)
    return out


def _epoch_boundaries(rows: list[dict]) -> list[int]:
    """Iterations at which a whole epoch ends, from the logged (iteration, epoch) pairs."""
    per_iteration = rows[-1]["epoch"] / rows[-1]["iteration"] if rows[-1]["iteration"] else 0
    if per_iteration <= 0:
        return []
    ipe = round(1 / per_iteration)
    return list(range(ipe, rows[-1]["iteration"] + 1, ipe))


def _read_summary(path: Path) -> dict | None:
    """summary.json as a dict, or None when absent or unreadable (a warning says which)."""
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        summary = err
    if isinstance(summary, dict):
        return summary
    warnings.warn(f"ignoring {path}: not a JSON object; summarising from metrics.jsonl", stacklevel=3)
    return None


def report_run(run_dir: Path, console: Console | None = None) -> list[Path]:
    """Write the plots and print the summary again (from summary.json, or from the metrics)."""
    console = console or make_console()
    paths = write_plots(run_dir)
    summary_path = Path(run_dir) / "summary.json"
    summary = _read_summary(summary_path)
    if summary is None:
        train, _ = read_metrics(run_dir)
        last = train[-1]
        summary = {"iterations": last["iteration"], "epochs": last["epoch"], "samples_seen": last["samples_seen"],
                   "final_loss": last["loss"], "note": "run unfinished: no summary.json"}
    print_summary(summary, console)
    for path in paths:
        console.print(f"wrote {path}")
    return paths
