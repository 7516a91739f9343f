"""Rank-0 reports: the plan table, live progress, metrics.jsonl, the trackers (sinks.py), the summary."""

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
from ddp_toolkit.sinks import open_sinks


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
    """Rank-0 sinks: plan.json, metrics.jsonl, a live console view, trackers; all no-ops on other ranks."""

    def __init__(self, cfg, env, plan: BatchPlan, enabled: bool = True, console: Console | None = None) -> None:
        self.cfg, self.env, self.plan, self.enabled = cfg, env, plan, enabled
        self.run_dir = Path(cfg.run_dir)
        self.console = console or make_console()
        self.last_metrics: dict = {}
        self.last_loss: float | None = None
        self._sinks: list = []
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
        atomic_write(self.run_dir / "plan.json", json.dumps(info, indent=2) + "\n")
        if self.cfg.report.console:
            plan_report.print_plan_table(self.plan, info, console=self.console)
            if "resumed_from" in info:
                self.console.print(f"resumed from checkpoint {info['resumed_from']} at iteration "
                                   f"{progress.iteration}")
            self._live = LiveProgress(self.console, self.plan, total_iterations, progress.iteration,
                                      fixed_batch="batch_schedule" not in info, epochs=info.get("epochs"))
        self._sinks = open_sinks(self.cfg, info, self.warn, (progress.iteration, progress.samples_seen))

    def _write(self, row: dict) -> None:
        if self.cfg.report.jsonl:
            append_line(self.metrics_path, json.dumps(row))
        for sink in self._sinks:
            sink.log(row)

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
            parts = [f"loss {result['eval_loss']:.4f}"]  # accuracy and perplexity only where they are defined
            parts += [f"{name} {result[key]:.4f}" for name, key in (("perplexity", "eval_perplexity"),
                                                                    ("accuracy", "eval_accuracy")) if key in result]
            self._live.note(f"eval at iteration {result['iteration']}: {', '.join(parts)} on "
                            f"{result['eval_samples']} samples")

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
        for sink in self._sinks:
            sink.summary(summary)

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


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

    def __init__(self, console: Console, plan: BatchPlan, total: int, start: int, fixed_batch: bool = True,
                 epochs: float | None = None) -> None:
        self.console, self.plan, self.total, self.fixed_batch = console, plan, total, fixed_batch
        self.epochs_total = max(1, math.ceil((plan.epochs_for(total) if epochs is None else epochs) - 1e-9))
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
        if self.fixed_batch:
            current, in_epoch = (it - 1) // ipe + 1, f"{(it - 1) % ipe + 1}/{ipe}"
        else:  # a batch-size schedule: iterations per epoch change with B, so the share of the epoch's samples
            current = max(1, min(math.ceil(m["epoch"] - 1e-9), self.epochs_total))
            in_epoch = f"{m['epoch'] - current + 1:.0%} at B {m['global_batch_size']}"
        epoch = f"{current}/{self.epochs_total}"
        rate = f"{m['samples_per_second']:,.0f}" if m.get("samples_per_second") else "-"
        if self._bar is not None:
            self._bar.update(self._task, completed=it, epoch=epoch, in_epoch=in_epoch, rate=rate,
                             loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.4g}")
        else:
            self.console.print(f"epoch {epoch} · iteration {it}/{self.total} (in epoch {in_epoch}) · "
                               f"samples_seen {m['samples_seen']} · loss {m['loss']:.4f} · lr {m['lr']:.4g} · "
                               f"{rate} samples/s", soft_wrap=True)

    def note(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def write_final_weights(run_dir: Path, model_state: dict) -> Path:
    """run_dir/final/model.safetensors by atomic replace; a disk error is one RunError line naming the file."""
    from safetensors.torch import save_file

    final = Path(run_dir) / "final"
    final.mkdir(parents=True, exist_ok=True)
    with atomic_path(final / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp)
    return final / "model.safetensors"


# ---- reading metrics.jsonl back (the resume cut here; plots and pages in report.py) -----------------------------
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
