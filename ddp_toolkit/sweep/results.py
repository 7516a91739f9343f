"""Typed records of a sweep's runs: one `PointResult` per point, read back from its run directory."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, NamedTuple

from ddp_toolkit.reporting import read_metrics

__all__ = ["Status", "CurvePoint", "PointResult", "COLUMNS", "read_json", "tail_loss"]

Status = Literal["finished", "diverged", "failed"]
"""finished: summary.json written; diverged: the trainer stopped on a non-finite loss (TrainingStopped);
failed: the run itself broke (bad config, launcher error) and says nothing about the rule."""
TRAIN_LOSS_TAIL = 0.05
"""final_train_loss is the mean logged train loss over the last 5 % of the sample budget."""


class CurvePoint(NamedTuple):
    """One logged value of a run: at `iteration`, after `samples_seen` samples (None: not finite/missing)."""

    iteration: int
    samples_seen: int
    value: float | None


def _no_csv() -> dict:
    return {"csv": False}


@dataclass(kw_only=True)
class PointResult:
    """The outcome of one point's run: plan, final metrics, noise scale; the fields are the CSV columns,
    except the curves (metadata csv=False)."""

    stage: Literal["grid", "main"]
    rule: str
    global_batch_size: int
    seed: int | None = None
    optimizer: str | None = None
    lr_scaling: str | None = None
    warmup: str | int | None = None
    base_lr: float | None = None
    scaled_lr: float | None = None
    world_size: int | None = None
    grad_accum_steps: int | None = None
    micro_batch_size: int | None = None
    iterations: int | None = None
    samples_seen: int | None = None
    final_train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    steps_to_target: int | None = None
    grad_noise_scale: float | None = None
    wall_seconds: float | None = None
    status: Status
    run_dir: str | None = None
    error: str | None = None
    curves: dict[str, list[CurvePoint]] = field(default_factory=dict, repr=False, metadata=_no_csv())
    """train_loss, eval_loss and eval_accuracy over the run (the sweep metric's curve gives steps-to-target)."""

    def value(self, metric: str) -> float | None:
        """The final value of a sweep metric, or None (diverged, failed, missing, non-finite)."""
        value = getattr(self, "final_train_loss" if metric == "train_loss" else metric)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    def csv_row(self) -> dict:
        return {name: ("" if getattr(self, name) is None else getattr(self, name)) for name in COLUMNS}


COLUMNS = [f.name for f in fields(PointResult) if f.metadata.get("csv", True)]
"""results.csv columns, in the order of PointResult's fields."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def tail_loss(train: list[dict]) -> float | None:
    """Mean logged train loss over the last TRAIN_LOSS_TAIL of the samples (a batch's loss alone is noisy)."""
    if not train:
        return None
    end = train[-1]["samples_seen"]
    tail = [r["loss"] for r in train if r["samples_seen"] >= (1 - TRAIN_LOSS_TAIL) * end] or [train[-1]["loss"]]
    return sum(tail) / len(tail)


def _last_noise_scale(train: list[dict]) -> float | None:
    values = [r.get("grad_noise_scale") for r in train if r.get("grad_noise_scale") is not None]
    return values[-1] if values else None


def _curve(rows: list[dict], key: str) -> list[CurvePoint]:
    return [CurvePoint(r["iteration"], r["samples_seen"], r.get(key)) for r in rows]


def collect_result(point, status: Status) -> PointResult:
    """A point's record from its run directory: point.json (status), plan.json, summary.json, metrics.jsonl."""
    run_dir, cfg = point.run_dir, point.config
    summary, plan = read_json(run_dir / "summary.json"), read_json(run_dir / "plan.json")
    marker = read_json(run_dir / "point.json")
    train, evals = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else ([], [])
    result = PointResult(
        stage=point.stage, rule=point.rule, global_batch_size=point.global_batch_size, seed=point.seed,
        status=marker.get("status", status), error=marker.get("error"), optimizer=cfg.optim.name,
        lr_scaling=cfg.optim.lr_scaling, warmup=cfg.optim.warmup, base_lr=cfg.optim.lr,
        scaled_lr=plan.get("scaled_lr"), world_size=point.world_size, grad_accum_steps=plan.get("grad_accum_steps"),
        micro_batch_size=cfg.batch.micro_batch_size, iterations=summary.get("iterations", cfg.train.iterations),
        samples_seen=summary.get("samples_seen"), final_train_loss=tail_loss(train),
        eval_loss=summary.get("eval_loss"), eval_accuracy=summary.get("eval_accuracy"),
        grad_noise_scale=_last_noise_scale(train), wall_seconds=summary.get("wall_seconds"), run_dir=str(run_dir),
        curves={"train_loss": _curve(train, "loss"), "eval_loss": _curve(evals, "eval_loss"),
                "eval_accuracy": _curve(evals, "eval_accuracy")})
    if result.status != "finished":
        result.final_train_loss = result.eval_loss = result.eval_accuracy = None
    return result
