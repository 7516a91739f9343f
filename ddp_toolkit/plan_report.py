"""What `ddp-toolkit plan` reports: the plan's numbers as one JSON object (`PLAN_FIELDS` documents every key),
a table, or plain sentences. Counts are worded with the right plural; no torch import.
"""

from __future__ import annotations

from collections import Counter

from ddp_toolkit.config import Config
from ddp_toolkit.config_plan import (
    cadence_iterations,
    milestone_iterations,
    reference_batch,
    scaling_warning,
    warmup_iterations,
)
from ddp_toolkit.lr import scaled_lr
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.recipe import warmup_start_factor
from ddp_toolkit.text import count, plural

__all__ = ["PLAN_FIELDS", "explain_plan", "plan_info", "plan_rows", "print_plan_table", "split_summary"]

PLAN_FIELDS: dict[str, str] = {
    "dataset_size": "N: training samples in one epoch",
    "micro_batch_size": "b: samples per device per forward pass",
    "world_size": "W: data-parallel processes",
    "grad_accum_steps": "k: micro_steps per device per iteration",
    "drop_last": "whether the short last global batch of each epoch is dropped",
    "global_batch_size": "B = b·W·k: samples per iteration over all devices",
    "local_batch_size": "b·k: samples per device per iteration",
    "iterations_per_epoch": "floor(N/B) with drop_last, else ceil(N/B)",
    "micro_steps_per_epoch_per_rank": "forward/backward passes one device runs per epoch",
    "samples_per_epoch": "samples trained on per epoch (N minus the dropped ones)",
    "dropped_samples_per_epoch": "N mod B with drop_last, else 0",
    "last_batch_size": "size of the last global batch of an epoch",
    "last_batch_split": "samples per [micro_step][rank] of the last global batch",
    "last_batch_summary": "the same split in words: cells and their sizes",
    "stop": "the run length as given (`20it`, `3ep`, `5000sp`)",
    "total_iterations": "iterations (optimizer steps) in the run",
    "epochs": "the run length in epochs",
    "total_samples": "samples seen over all devices in the run",
    "batch_schedule": "batch.schedule / batch.ramp only: per phase that starts in the run, its global_batch_size, "
                      "grad_accum_steps, local_batch_size, until, first_iteration, iterations, first_samples_seen, "
                      "first_epoch and scaled_lr (the lr rule at that B); the plan fields above are the first phase's",
    "base_lr": "optim.lr: the learning rate at the reference batch",
    "base_batch_size": "B_ref: the reference batch of base_lr",
    "base_batch_size_from": "where B_ref came from: optim.base_batch_size, or the global batch when none is set",
    "lr_rule": "the first (or only) scaling rule",
    "scaled_lr": "the learning rate at B under lr_rule",
    "scaled_lr_by_rule": "{rule: learning rate at B} for every rule asked for",
    "warmup_iterations": "optim.warmup in iterations (cut to the run when longer)",
    "warmup_start_factor": "fraction of scaled_lr used by the first warmup step (optim.warmup_start_factor; auto: "
                           "base_lr/scaled_lr under lr_rule when it scales, else 0)",
    "schedule": "optim.schedule: constant, cosine, step or wsd",
    "step_milestones_iterations": "optim.step_milestones in iterations (those inside the run)",
    "eval_every_iterations": "train.eval_every in iterations (0: only at the end)",
    "checkpoint_every_iterations": "train.checkpoint_every in iterations (0: only at the end)",
    "log_every_iterations": "train.log_every",
    "warnings": "lines about settings that cannot take effect, e.g. a scaling rule without a reference batch "
                "(also printed on stderr)",
    "notes": "lines about settings adapted to this run, e.g. a warmup cut to the run (also printed on stderr)",
    "scaling": "with --bandwidth only: the ring all-reduce estimate for W = 8 … 1024 (inputs, `points` with "
               "world_size, comm_seconds, iteration_seconds, comm_share, hiding_k; see ddp_toolkit/scaling.py)",
}
"""Every key of `ddp-toolkit plan --json`, with its meaning (docs/config.md is generated from this)."""


def split_summary(plan: BatchPlan) -> str:
    """The last global batch's split in words: `16 × 8 cells: 31 samples each, 2 cells of 30`."""
    k, w = plan.grad_accum_steps, plan.world_size
    sizes = Counter(n for row in plan.last_batch_split for n in row)
    shape = f"{k} × {w} {plural(k * w, 'cell')} (micro_steps × ranks)"
    if len(sizes) == 1:
        (size, _), = sizes.items()
        return f"{shape}: {count(size, 'sample')} each"
    (most, _), (other, n_other) = sorted(sizes.items(), key=lambda item: (item[1], item[0]), reverse=True)
    empty = " (an empty cell joins the all-reduce with a zero gradient)" if 0 in sizes else ""
    return f"{shape}: {count(most, 'sample')} each, except {count(n_other, 'cell')} of {other}{empty}"


def plan_info(cfg: Config, plan: BatchPlan, rules: list[str] | None = None) -> dict:
    """Every number of the plan for `cfg` (see PLAN_FIELDS); `rules` default to [optim.lr_scaling]."""
    from ddp_toolkit.recipe import schedule_of_plan

    rules, batches = rules or [cfg.optim.lr_scaling], schedule_of_plan(cfg, plan)
    total = batches.iterations_in(cfg.train.stop)
    info = {**plan.to_dict(), "last_batch_summary": split_summary(plan), "stop": str(cfg.train.stop),
            "total_iterations": total, "epochs": batches.epochs_for(total), "total_samples": batches.samples_for(total)}
    if not batches.is_fixed:
        info["batch_schedule"] = _phase_rows(cfg, batches, total, rules[0])
    ref, ref_from = reference_batch(cfg, plan)
    by_rule = {rule: scaled_lr(cfg.optim.lr, plan.global_batch_size, ref, rule) for rule in rules}
    info.update(base_lr=cfg.optim.lr, base_batch_size=ref, base_batch_size_from=ref_from, lr_rule=rules[0],
                scaled_lr=by_rule[rules[0]], scaled_lr_by_rule=by_rule)
    warmup, warmup_note = warmup_iterations(cfg, batches, total)
    milestones, milestone_note = milestone_iterations(cfg, batches, total)
    info.update(warmup_iterations=warmup, warmup_start_factor=warmup_start_factor(cfg, plan, rules[0]),
                schedule=cfg.optim.schedule, step_milestones_iterations=list(milestones),
                eval_every_iterations=cadence_iterations(cfg.train.eval_every, batches),
                checkpoint_every_iterations=cadence_iterations(cfg.train.checkpoint_every, batches),
                log_every_iterations=cfg.train.log_every)
    warning = scaling_warning(cfg, next((r for r in rules if r != "none"), "none"))
    info["warnings"] = [warning] if warning else []
    info["notes"] = [n for n in (warmup_note, milestone_note) if n]
    return info


def _phase_rows(cfg: Config, batches, total: int, rule: str) -> list[dict]:
    """One dict per phase of a batch-size schedule that starts within the run: B, k, where it starts, how long it
    lasts and its lr under `rule` (the warmup/decay shape comes on top)."""
    starts = batches.phase_starts(total)
    out = []
    for (j, pos), nxt in zip(starts, [*starts[1:], None], strict=True):
        plan, until = batches.phases[j].plan, batches.phases[j].until
        end = total if nxt is None else nxt[1].iteration
        ref, _ = reference_batch(cfg, plan)
        out.append({"phase": j, "global_batch_size": plan.global_batch_size, "grad_accum_steps": plan.grad_accum_steps,
                    "local_batch_size": plan.local_batch_size, "until": None if until is None else str(until),
                    "first_iteration": pos.iteration, "iterations": end - pos.iteration,
                    "first_samples_seen": pos.samples_seen, "first_epoch": batches.epochs_at(pos),
                    "scaled_lr": scaled_lr(cfg.optim.lr, plan.global_batch_size, ref, rule)})
    return out


def describe(plan: BatchPlan) -> str:
    """`global batch 512 = 32 micro × 4 devices × 4 accumulation`, with `1 device` when W is 1."""
    return (f"global batch {plan.global_batch_size} = {plan.micro_batch_size} micro × "
            f"{count(plan.world_size, 'device')} × {plan.grad_accum_steps} accumulation")


def _every(iterations: int) -> str:
    return f"every {count(iterations, 'iteration')}" if iterations else "at the end only"


def plan_rows(plan: BatchPlan, info: dict, verbose: bool = False) -> list[tuple[str, str]]:
    """(label, value) rows: the batch, an epoch, the run, the learning rates side by side, schedule, cadences."""
    rows = [("global batch", describe(plan)),
            ("local batch (per device per iteration)", f"{plan.local_batch_size} = {plan.micro_batch_size} micro × "
                                                       f"{plan.grad_accum_steps} accumulation"),
            ("dataset size", count(plan.dataset_size, "sample")),
            ("iterations per epoch", f"{plan.iterations_per_epoch:,}"),
            ("micro_steps per epoch per rank", f"{plan.micro_steps_per_epoch_per_rank:,}")]
    if plan.drop_last:
        rows.append(("samples dropped per epoch", f"{plan.dropped_samples_per_epoch:,}"))
    elif plan.last_batch_size != plan.global_batch_size:
        rows.append(("last global batch", f"{count(plan.last_batch_size, 'sample')}: {info['last_batch_summary']}"))
        if verbose:
            rows.append(("last batch split [micro_step][rank]", str(plan.last_batch_split)))
    else:
        rows.append(("last global batch", f"{plan.last_batch_size} (full)"))
    if "batch_schedule" in info:  # the rows above describe the first phase
        rows = [(f"{label} (phase 0)" if i in (0, 1, 3, 4) else label, value) for i, (label, value) in enumerate(rows)]
    for phase in info.get("batch_schedule", []):
        rows.append((f"batch phase {phase['phase']}", f"B {phase['global_batch_size']} (k {phase['grad_accum_steps']}) "
                     f"from iteration {phase['first_iteration']:,} ({count(phase['first_samples_seen'], 'sample')}, "
                     f"epoch {phase['first_epoch']:.3g}) for {count(phase['iterations'], 'iteration')}, "
                     f"lr {phase['scaled_lr']:.6g}" + (f", until {phase['until']}" if phase["until"] else "")))
    rows.append(("run length", f"{count(info['total_iterations'], 'iteration')} = {count(info['epochs'], 'epoch')} "
                               f"= {count(info['total_samples'], 'sample')}"))
    rates = ", ".join(f"{rate:.6g} ({rule})" for rule, rate in info["scaled_lr_by_rule"].items())
    rows.append(("learning rate", f"{info['base_lr']:.6g} at batch {info['base_batch_size']} "
                                  f"[{info['base_batch_size_from']}] → {rates} at batch {plan.global_batch_size}"))
    warmup = info["warmup_iterations"]
    in_epochs = "" if "batch_schedule" in info else f" = {count(plan.epochs_for(warmup), 'epoch')}"
    rows.append(("warmup", f"{count(warmup, 'iteration')}{in_epochs}, from "
                           f"{info['warmup_start_factor']:.6g} × the scaled lr" if warmup else "none"))
    milestones = ", ".join(f"{m:,}" for m in info["step_milestones_iterations"])
    rows.append(("lr schedule", f"{info['schedule']}" + (f", decay at iterations {milestones}" if milestones else "")))
    rows.append(("evaluation", _every(info["eval_every_iterations"])))
    rows.append(("checkpoints", _every(info["checkpoint_every_iterations"])))
    rows += [(key, str(info[key])) for key in ("engine", "backend", "launcher", "precision", "resumed_from")
             if key in info]
    return rows


def print_plan_table(plan: BatchPlan, info: dict, verbose: bool = False, console=None) -> None:
    """The plan as a two-column table (plain text when stdout is not a terminal)."""
    from rich.markup import escape
    from rich.table import Table

    from ddp_toolkit.reporting import make_console

    console = console or make_console()
    table = Table(title="batch plan", show_header=False, box=None)
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in plan_rows(plan, info, verbose):
        table.add_row(escape(label), escape(value))
    console.print(table)


def explain_plan(plan: BatchPlan, info: dict) -> str:
    """The plan in plain sentences: the questions newcomers ask about batches, iterations and epochs."""
    n, B, ipe = plan.dataset_size, plan.global_batch_size, plan.iterations_per_epoch
    its = count(ipe, "iteration")
    lines = [f"Each iteration (one optimizer step, one weight update, one gradient all-reduce) uses a global batch "
             f"of {count(B, 'sample')}: {plan.micro_batch_size} per forward pass (micro_batch_size) × "
             f"{count(plan.world_size, 'device')} (world_size) × {count(plan.grad_accum_steps, 'accumulation step')} "
             f"(grad_accum_steps). Each device processes {count(plan.local_batch_size, 'sample')} per iteration "
             f"(local_batch_size)."]
    if plan.drop_last:
        lines.append(f"One epoch is one pass over the {count(n, 'sample')}: {n} / {B} = {ipe} full "
                     f"{plural(ipe, 'batch')}, so {its} per epoch = {count(ipe, 'weight update')} per epoch; the last "
                     f"{count(plan.dropped_samples_per_epoch, 'sample')} of each shuffled epoch are dropped.")
    elif plan.last_batch_size != B:
        lines.append(f"One epoch is one pass over the {count(n, 'sample')}: {count(ipe - 1, 'full batch')} of {B} "
                     f"and a last batch of {plan.last_batch_size}, so {its} per epoch = "
                     f"{count(ipe, 'weight update')} per epoch (the last one averages the gradient over its "
                     f"{count(plan.last_batch_size, 'sample')}).")
    else:
        lines.append(f"One epoch is one pass over the {count(n, 'sample')}: {n} / {B} = {count(ipe, 'batch')}, so "
                     f"{its} per epoch = {count(ipe, 'weight update')} per epoch.")
    total = info["total_iterations"]
    lines.append(f"The run is {count(total, 'iteration')} = {count(info['epochs'], 'epoch')} = "
                 f"{count(total, 'weight update')}, seeing {count(info['total_samples'], 'sample')} in all.")
    lines.append(f"Conversions: {count(plan.iterations_for(1), 'iteration')} = 1 epoch; 1 iteration = "
                 f"{count(plan.epochs_for(1), 'epoch')}; iterations = epochs × {ipe}.")
    for rule, rate in info["scaled_lr_by_rule"].items():
        lines.append(f"Learning rate: {info['base_lr']:.6g} was tuned at batch {info['base_batch_size']} "
                     f"({info['base_batch_size_from']}); the {rule} rule gives {rate:.6g} at batch {B}.")
    return "\n".join(lines)
