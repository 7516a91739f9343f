"""`ddp-toolkit sweep SWEEP.yaml`: large-batch learning-rate rules tested across global batch sizes.

One point per (global batch size B, rule), every point on the same sample budget: ceil(samples / B)
iterations of full batches (drop_last), so a larger batch takes proportionally fewer steps. An optional lr
grid is tried first at the smallest batch B_ref and its best base lr is used by every rule. The verdict gives,
for each rule, the largest B whose final metric stays within a tolerance of the rule's B_ref point, next to
the gradient noise scale B_simple measured during training (McCandlish et al. 2018: the batch size beyond
which bigger batches stop paying for themselves). Rules: none, linear with gradual warmup (Goyal et al. 2017),
sqrt, adam_sqrt (Malladi et al. 2022), or another optimizer (LARS, LAMB).

A point runs either in this process with gradient accumulation (W = 1, k = B / b) or as W processes under
torch.distributed.run. The trainer's (W, k)-equivalence (same global batches, same mean gradient per step)
makes both the same run, up to floating-point summation order.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ddp_toolkit.config import ConfigError, load_raw, validate
from ddp_toolkit.lr import scaled_lr
from ddp_toolkit.plan import BatchPlan, parse_duration

__all__ = ["SweepSpec", "RuleSpec", "Point", "SweepError", "load_sweep", "expand_points", "iterations_for_budget",
           "micro_batch_for", "verdicts", "steps_to_target", "run_sweep", "add_sweep_parser"]

METRICS = {"eval_accuracy": ("eval_accuracy", True), "eval_loss": ("eval_loss", False),
           "train_loss": ("final_train_loss", False)}
"""Sweep metric → (results column, higher is better)."""

BUILTIN_TRAIN_SIZE = {"digits": 1437}
TRAIN_LOSS_TAIL = 0.05
"""final_train_loss is the mean logged train loss over the last 5 % of the sample budget."""

COLUMNS = ["stage", "rule", "global_batch_size", "optimizer", "lr_scaling", "warmup", "base_lr", "scaled_lr",
           "world_size", "grad_accum_steps", "micro_batch_size", "iterations", "samples_seen", "final_train_loss",
           "eval_loss", "eval_accuracy", "steps_to_target", "grad_noise_scale", "wall_seconds", "status",
           "run_dir"]


class SweepError(RuntimeError):
    """The sweep cannot go on (e.g. every lr of the grid diverged); one line, exit code 1."""


# ---- the sweep file ---------------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuleSpec(_Model):
    """One large-batch rule: how the base lr tuned at B_ref becomes the lr at B."""

    name: str = Field(min_length=1)
    """Label in tables and plots."""
    lr_scaling: Literal["none", "linear", "sqrt", "adam_sqrt"] = "none"
    warmup: str | int = 0
    """Gradual warmup (`20000sp`, `2ep`, `100it`); samples or epochs keep the same share of every run."""
    warmup_start: float | Literal["base"] = "base"
    """First warmup step's fraction of the scaled lr; `base` starts at the unscaled lr (Goyal et al.)."""
    optimizer: Literal["sgd", "adam", "adamw", "lars", "lamb"] | None = None
    """Optimizer of this rule (default: the base config's)."""
    lr: float | None = Field(None, gt=0)
    """Base lr at B_ref for this rule (e.g. LARS, whose trust ratio needs a larger one); default: tuned."""

    @field_validator("warmup")
    @classmethod
    def _duration(cls, value: str | int) -> str | int:
        parse_duration(value)
        return value

    @field_validator("warmup_start")
    @classmethod
    def _fraction(cls, value: float | str) -> float | str:
        if value != "base" and not 0.0 <= value <= 1.0:
            raise ValueError("must be 'base' or a fraction in [0, 1]")
        return value


class SweepSpec(_Model):
    """A sweep file: base run config, global batch sizes, rules, sample budget, verdict tolerance."""

    base: str | dict
    """Run config: a YAML path (relative to the sweep file) or an inline mapping."""
    batch_sizes: list[int] = Field(min_length=1)
    """Global batch sizes B; the smallest is B_ref, where the base lr is tuned."""
    rules: list[RuleSpec] = Field(min_length=1)
    samples: int = Field(gt=0)
    """Sample budget of every point: iterations = ceil(samples / B)."""
    tolerance: float = Field(ge=0)
    """A point holds when its metric is within this (absolute, metric units) of its rule's B_ref point."""
    metric: Literal["eval_accuracy", "eval_loss", "train_loss"] = "eval_accuracy"
    lr_grid: list[float] = Field(default_factory=list)
    """Base lrs tried at B_ref (rule none, no warmup); the best by metric is used by every rule."""
    micro_batch_size: int | None = Field(None, gt=0)
    """Largest b per forward pass (default: the base config's batch.micro_batch_size)."""
    processes: int = Field(1, gt=0)
    """W: 1 trains in this process with accumulation; more start torch.distributed.run per point."""
    evals: int = Field(20, gt=0)
    """Evaluations per point (resolution of steps-to-target)."""
    target: float | None = None
    """Metric value for steps-to-target; default: the worst rule reference worsened by the tolerance."""
    noise_scale: bool = True
    """Measure the gradient noise scale in every point (W = 1 then keeps k >= 2)."""
    threads: int | None = Field(None, gt=0)
    """torch threads for points trained in this process (default: torch's choice)."""

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, value: list[int]) -> list[int]:
        if any(b <= 0 for b in value):
            raise ValueError("global batch sizes must be positive")
        if len(set(value)) != len(value):
            raise ValueError("global batch sizes must be distinct")
        return sorted(value)

    @field_validator("rules")
    @classmethod
    def _unique(cls, value: list[RuleSpec]) -> list[RuleSpec]:
        names = [r.name for r in value]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"rule name {dup!r} appears twice")
        return value

    @field_validator("lr_grid")
    @classmethod
    def _grid(cls, value: list[float]) -> list[float]:
        if any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0) for v in value):
            raise ValueError("every lr must be a positive number")
        return [float(v) for v in value]

    @property
    def reference_batch_size(self) -> int:
        return self.batch_sizes[0]


@dataclass
class Sweep:
    """A loaded sweep: the validated spec, the base run config (raw dict) and where the file was."""

    spec: SweepSpec
    base: dict
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.path else "sweep"


def _format_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key {key!r}"
    msg = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) and key else ""
    return f"{where}: {key}: {msg}{shown}" if key else f"{where}: {msg}"


def sweep_from_dict(raw: Any, path: Path | None = None) -> Sweep:
    """Validate a sweep mapping and its base config; one ConfigError line on the first problem."""
    where = f"sweep file {str(path)!r}" if path else "sweep"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping, got a {type(raw).__name__}")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, where)) from None
    if isinstance(spec.base, str):
        base_path = Path(spec.base)
        if not base_path.is_absolute() and path is not None:
            base_path = path.parent / base_path
        base = load_raw(base_path)
    else:
        base = deepcopy(spec.base)
    try:
        validate(base)
    except ConfigError as err:
        raise ConfigError(f"{where}: base: {err}") from None
    sweep = Sweep(spec, base, path)
    _check_consistent(sweep, where)
    return sweep


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep YAML file (see `SweepSpec`)."""
    path = Path(path)
    return sweep_from_dict(load_raw(path), path)


def _train_size(base: dict) -> int | None:
    """N of the built-in data sets (None for custom data)."""
    data = validate(base).data
    if data.name == "synthetic":
        return data.size
    return BUILTIN_TRAIN_SIZE.get(data.name)


def _check_consistent(sweep: Sweep, where: str) -> None:
    """What the fields cannot check alone: W divides B, B fits the data, warmups fit the runs, an eval set."""
    spec, W = sweep.spec, sweep.spec.processes
    for B in spec.batch_sizes:
        if B % W:
            raise ConfigError(f"{where}: batch_sizes: global batch {B} is not divisible by processes {W}")
    n = _train_size(sweep.base)
    if n is not None and spec.batch_sizes[-1] > n:
        raise ConfigError(f"{where}: batch_sizes: global batch {spec.batch_sizes[-1]} is larger than the "
                          f"{n} training samples (points drop the short last batch)")
    data = validate(sweep.base).data
    if spec.metric.startswith("eval_") and data.name == "synthetic" and data.eval_size == 0:
        raise ConfigError(f"{where}: metric: {spec.metric} needs an eval set, but base data.eval_size is 0")
    for i, rule in enumerate(spec.rules):
        for B in spec.batch_sizes:
            warmup, total = _warmup_iterations(rule.warmup, B, n), iterations_for_budget(spec.samples, B)
            if warmup is not None and warmup > total:
                raise ConfigError(f"{where}: rules.{i}.warmup: {rule.warmup!r} is {warmup} iterations at global "
                                  f"batch {B}, longer than its run of {total} iterations")


def _warmup_iterations(warmup: str | int, B: int, n: int | None) -> int | None:
    """The warmup in iterations at global batch B, as the trainer converts it (None: epochs of unknown N)."""
    if n is not None:
        return BatchPlan(dataset_size=n, micro_batch_size=B, world_size=1, drop_last=True).iterations_in(warmup)
    value, unit = parse_duration(warmup)
    if unit == "ep":
        return None
    return int(value) if unit == "it" else -(-int(value) // B)


# ---- points --------------------------------------------------------------------------------------------
def iterations_for_budget(samples: int, global_batch_size: int) -> int:
    """Iterations of full global batches that see at least `samples` samples: ceil(samples / B)."""
    if samples <= 0 or global_batch_size <= 0:
        raise ValueError(f"samples and global_batch_size must be positive, got {samples} and {global_batch_size}")
    return -(-samples // global_batch_size)


def micro_batch_for(global_batch_size: int, world_size: int, cap: int, two_micro_steps: bool = False) -> int:
    """Largest b <= cap dividing the local batch B / W; with `two_micro_steps` also b <= B / (2W), so that
    k >= 2 and a single process can measure the noise scale from its micro-batches."""
    local = global_batch_size // world_size
    limit = min(cap, local // 2 if two_micro_steps and local > 1 else local)
    return next(b for b in range(max(limit, 1), 0, -1) if local % b == 0)


@dataclass
class Point:
    """One training run of the sweep: a rule (or a grid lr) at one global batch size."""

    stage: Literal["grid", "main"]
    rule: str
    global_batch_size: int
    world_size: int
    config: dict
    """The run config (raw mapping, validated); config['run_dir'] is where it writes."""
    same_as: Point | None = None
    """An earlier point with the same effective config: this one reuses its run."""
    row: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def label(self) -> str:
        return f"B={self.global_batch_size} {self.rule}"

    def fingerprint(self) -> dict:
        """What makes two runs the same: the config without run_dir and reports, and W."""
        cfg = {k: v for k, v in self.config.items() if k not in ("run_dir", "report")}
        return json.loads(json.dumps({"config": cfg, "world_size": self.world_size}, sort_keys=True))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "rule"


def point_config(sweep: Sweep, B: int, lr: float, rule: RuleSpec | None, run_dir: Path, world_size: int) -> dict:
    """The run config of one point: budget → iterations, B and b, the rule's lr, warmup and optimizer.

    At B_ref every rule gives the base lr, and a warmup that starts at the peak is no warmup: both are
    normalised away, so runs that are the same have the same config (and are trained once).
    """
    spec, raw = sweep.spec, deepcopy(sweep.base)
    B_ref = spec.reference_batch_size
    iterations = iterations_for_budget(spec.samples, B)
    cap = spec.micro_batch_size or validate(sweep.base).batch.micro_batch_size
    b = micro_batch_for(B, world_size, cap, two_micro_steps=spec.noise_scale and world_size == 1)
    batch = {k: v for k, v in raw.get("batch", {}).items() if k != "grad_accum_steps"}
    raw["batch"] = {**batch, "micro_batch_size": b, "global_batch_size": B, "drop_last": True}
    rule_name = rule.lr_scaling if rule and B != B_ref else "none"
    optim = {k: v for k, v in raw.get("optim", {}).items() if k not in ("warmup", "warmup_start_factor")}
    optim.update(lr=lr, base_batch_size=B_ref, lr_scaling=rule_name)
    if rule is not None and rule.optimizer:
        optim["name"] = rule.optimizer
    factor = scaled_lr(lr, B, B_ref, rule_name) / lr
    start = (1.0 / factor if factor >= 1 else 1.0) if rule is None or rule.warmup_start == "base" \
        else rule.warmup_start
    if rule is not None and parse_duration(rule.warmup)[0] > 0 and start < 1.0:
        optim.update(warmup=rule.warmup, warmup_start_factor=start)
    raw["optim"] = optim
    train = {k: v for k, v in raw.get("train", {}).items()
             if k not in ("epochs", "samples", "halt_at", "checkpoint_every", "resume")}
    train.update(iterations=iterations, log_every=max(1, iterations // 500),
                 eval_every=max(1, iterations // spec.evals), noise_scale=spec.noise_scale)
    raw["train"] = train
    raw["report"] = {**raw.get("report", {}), "console": False, "jsonl": True}
    raw["run_dir"] = str(run_dir)
    validate(raw)
    return raw


def grid_points(sweep: Sweep, out: Path, world_size: int) -> list[Point]:
    """The lr grid at B_ref: rule none, no warmup, the base optimizer."""
    B = sweep.spec.reference_batch_size
    return [Point("grid", f"lr={lr:g}", B, world_size,
                  point_config(sweep, B, lr, None, out / "grid" / f"lr{lr:g}", world_size))
            for lr in sweep.spec.lr_grid]


def main_points(sweep: Sweep, out: Path, world_size: int, base_lr: float, done: list[Point] = ()) -> list[Point]:
    """One point per (rule, B); a point whose config equals an earlier one's (in `done` or here) reuses it."""
    seen = {json.dumps(p.fingerprint(), sort_keys=True): p for p in done if p.same_as is None}
    points = []
    for rule in sweep.spec.rules:
        for B in sweep.spec.batch_sizes:
            run_dir = out / "points" / _slug(rule.name) / f"B{B:05d}"
            cfg = point_config(sweep, B, rule.lr or base_lr, rule, run_dir, world_size)
            point = Point("main", rule.name, B, world_size, cfg)
            key = json.dumps(point.fingerprint(), sort_keys=True)
            point.same_as = seen.get(key)
            if point.same_as is not None:
                point.config = {**cfg, "run_dir": point.same_as.config["run_dir"]}
            else:
                seen[key] = point
            points.append(point)
    return points


def expand_points(sweep: Sweep, out: Path, world_size: int | None = None, base_lr: float | None = None
                  ) -> list[Point]:
    """Every point of the sweep without training (grid, then main points at `base_lr`, default the base lr)."""
    W = _world_size(sweep, world_size)
    grid = grid_points(sweep, out, W)
    lr = base_lr if base_lr is not None else validate(sweep.base).optim.lr
    return grid + main_points(sweep, out, W, lr, grid)


def _world_size(sweep: Sweep, processes: int | None) -> int:
    """--processes (or the file's `processes`), checked against every global batch."""
    W = processes or sweep.spec.processes
    if W < 1:
        raise ConfigError(f"--processes must be >= 1, got {W}")
    bad = [B for B in sweep.spec.batch_sizes if B % W]
    if bad:
        raise ConfigError(f"--processes {W} does not divide global batch {bad[0]}; use a W that divides every "
                          f"batch size in {sweep.spec.batch_sizes}")
    return W


# ---- running one point ------------------------------------------------------------------------------------
def is_finished(point: Point) -> bool:
    """A finished run: run_dir/summary.json (or a recorded divergence) for exactly this point's config."""
    marker = point.run_dir / "point.json"
    if not marker.exists():
        return False
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if record.get("fingerprint") != point.fingerprint():
        return False
    if record.get("status") == "diverged":
        return True
    summary = point.run_dir / "summary.json"
    if not summary.exists():
        return False
    try:
        data = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return not data.get("halted") and not data.get("preempted")


def _clear_run_dir(run_dir: Path) -> None:
    """Remove a stale run (metrics.jsonl is appended to); refuse to touch a folder the sweep did not write."""
    if not run_dir.exists():
        return
    if not (run_dir / "point.json").exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run_dir {str(run_dir)!r} exists and was not written by a sweep; choose another --out")
    shutil.rmtree(run_dir)


def _write_marker(point: Point, status: str, error: str | None = None) -> None:
    record = {"fingerprint": point.fingerprint(), "status": status, "rule": point.rule,
              "global_batch_size": point.global_batch_size}
    if error:
        record["error"] = error
    (point.run_dir / "point.json").write_text(json.dumps(record, indent=2) + "\n")


def _train_here(config: dict) -> None:
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import train_from_config

    train_from_config(validate(config), env=DistEnv())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(config_path: Path, world_size: int) -> list[str]:
    """torch.distributed.run on loopback, W workers of launch/train.py (or the CLI module) on one config."""
    script = Path(__file__).resolve().parent.parent / "launch" / "train.py"
    target = [str(script)] if script.exists() else ["-m", "ddp_toolkit.cli", "train"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--local-addr=127.0.0.1",
            "--max-restarts=0", *target, str(config_path)]


def _train_launched(point: Point) -> None:
    """W processes under torch.distributed.run; output in run_dir/launch.log."""
    config_path = point.run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(point.config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = point.run_dir / "launch.log"
    with open(log, "w") as fh:
        code = subprocess.call(launch_command(config_path, point.world_size), stdout=fh, stderr=subprocess.STDOUT,
                               env=env)
    if code != 0:
        text = log.read_text(errors="replace")
        errors = [line for line in text.splitlines() if "error" in line.lower()]
        detail = errors[-1].strip() if errors else f"exit code {code}"
        if "non-finite" in text:
            from ddp_toolkit.trainer import TrainingStopped

            raise TrainingStopped(detail)
        raise RuntimeError(f"torch.distributed.run exited with {code}: {detail} (see {log})")


def run_point(point: Point) -> str:
    """Train one point (in this process when W = 1); returns finished, diverged or failed."""
    from ddp_toolkit.trainer import TrainingStopped

    _clear_run_dir(point.run_dir)
    point.run_dir.mkdir(parents=True)
    _write_marker(point, "running")
    try:
        if point.world_size == 1:
            _train_here(point.config)
        else:
            _train_launched(point)
    except TrainingStopped as err:  # a non-finite loss: the rule broke at this batch size
        _write_marker(point, "diverged", str(err))
        return "diverged"
    except (ConfigError, RuntimeError, ValueError) as err:
        _write_marker(point, "failed", f"{type(err).__name__}: {err}")
        return "failed"
    _write_marker(point, "finished")
    return "finished"


# ---- one point's results --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect_row(point: Point, status: str) -> dict:
    """A results row: plan, final metrics, train-loss tail, noise scale; curves kept under `_` keys."""
    run_dir = point.run_dir
    summary, plan = _read_json(run_dir / "summary.json"), _read_json(run_dir / "plan.json")
    marker = _read_json(run_dir / "point.json")
    rows = _read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    o = point.config["optim"]
    row = {
        "stage": point.stage, "rule": point.rule, "global_batch_size": point.global_batch_size,
        "optimizer": o.get("name", "sgd"), "lr_scaling": o["lr_scaling"], "warmup": o.get("warmup", 0),
        "base_lr": o["lr"], "scaled_lr": plan.get("scaled_lr"), "world_size": point.world_size,
        "grad_accum_steps": plan.get("grad_accum_steps"),
        "micro_batch_size": point.config["batch"]["micro_batch_size"],
        "iterations": summary.get("iterations", point.config["train"]["iterations"]),
        "samples_seen": summary.get("samples_seen"), "final_train_loss": _tail_loss(train),
        "eval_loss": summary.get("eval_loss"), "eval_accuracy": summary.get("eval_accuracy"),
        "steps_to_target": None, "grad_noise_scale": _last_noise_scale(train),
        "wall_seconds": summary.get("wall_seconds"), "status": marker.get("status", status),
        "run_dir": str(run_dir),
        "_loss_curve": [(r["samples_seen"], r["loss"]) for r in train],
        "_eval_curve": evals, "_train_curve": train,
    }
    if row["status"] != "finished":
        row.update(final_train_loss=None, eval_loss=None, eval_accuracy=None)
    return row


def _tail_loss(train: list[dict]) -> float | None:
    """Mean logged train loss over the last TRAIN_LOSS_TAIL of the samples (a batch's loss alone is noisy)."""
    if not train:
        return None
    end = train[-1]["samples_seen"]
    tail = [r["loss"] for r in train if r["samples_seen"] >= (1 - TRAIN_LOSS_TAIL) * end] or [train[-1]["loss"]]
    return sum(tail) / len(tail)


def _last_noise_scale(train: list[dict]) -> float | None:
    values = [r.get("grad_noise_scale") for r in train if r.get("grad_noise_scale") is not None]
    return values[-1] if values else None


# ---- verdict ---------------------------------------------------------------------------------------------
def metric_value(row: dict, metric: str) -> float | None:
    """The row's value of the sweep metric, or None (diverged, failed, missing, non-finite)."""
    value = row.get(METRICS[metric][0])
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def within(value: float | None, reference: float | None, metric: str, tolerance: float) -> bool:
    """Is `value` no worse than `reference` by more than `tolerance` (in the metric's direction)?"""
    if value is None or reference is None:
        return False
    higher = METRICS[metric][1]
    return value >= reference - tolerance if higher else value <= reference + tolerance


def verdicts(rows: list[dict], metric: str, tolerance: float) -> list[dict]:
    """Per rule: the reference (its smallest-B point), the largest B up to which every point is within
    tolerance of it, the first B that is not, and the noise scale measured in the reference run.

    A diverged point is outside the tolerance; a failed one (the run itself broke) is left out, not judged.
    """
    out = []
    judged = [r for r in rows if r["stage"] == "main" and r.get("status") != "failed"]
    for rule in dict.fromkeys(r["rule"] for r in judged):
        pts = sorted((r for r in judged if r["rule"] == rule), key=lambda r: r["global_batch_size"])
        ref = pts[0]
        ref_value = metric_value(ref, metric)
        holds, breaks = None, None
        for r in pts:
            if within(metric_value(r, metric), ref_value, metric, tolerance):
                holds = r["global_batch_size"]
            else:
                breaks = r["global_batch_size"]
                break
        out.append({"rule": rule, "reference_batch_size": ref["global_batch_size"], "reference_value": ref_value,
                    "largest_batch_size": holds, "breaks_at": breaks,
                    "within_tolerance": [r["global_batch_size"] for r in pts
                                         if within(metric_value(r, metric), ref_value, metric, tolerance)],
                    "noise_scale": ref.get("grad_noise_scale")})
    return out


def default_target(reference_rows: list[dict], metric: str, fraction: float = 0.5) -> float | None:
    """What the reference runs reach after `fraction` of their budget (the worst of them): B_ref then needs that
    share of its steps, perfect scaling keeps the share at every B, and beyond it larger batches need more."""
    values = []
    for row in reference_rows:
        curve = _metric_curve(row, metric)
        if curve:
            end = curve[-1][1]
            values.append(next(v for _, s, v in curve if s >= fraction * end))
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return min(values) if METRICS[metric][1] else max(values)


def steps_to_target(curve: list[tuple[int, float | None]], target: float, metric: str) -> int | None:
    """First iteration whose metric reaches the target (None if never): the y of Shallue et al.'s plots."""
    higher = METRICS[metric][1]
    for iteration, value in curve:
        if value is not None and math.isfinite(value) and (value >= target if higher else value <= target):
            return iteration
    return None


def _metric_curve(row: dict, metric: str) -> list[tuple[int, int, float | None]]:
    """(iteration, samples_seen, value) of the sweep metric over a run (train rows for train_loss)."""
    rows = row.get("_train_curve" if metric == "train_loss" else "_eval_curve", [])
    key = "loss" if metric == "train_loss" else metric
    return [(r["iteration"], r["samples_seen"], r.get(key)) for r in rows]


# ---- outputs --------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if 1000 <= abs(value) < 1e6 else f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


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


def markdown(sweep: Sweep, rows: list[dict], verdict_rows: list[dict], info: dict) -> str:
    """results.md: setup, verdict, the metric by batch size × rule, all points, the lr grid, the plots."""
    spec, metric = sweep.spec, sweep.spec.metric
    main = [r for r in rows if r["stage"] == "main"]
    rules = list(dict.fromkeys(r["rule"] for r in main))
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Every point trains on the same budget of {spec.samples:,} samples: iterations = ceil(samples / B) "
             f"full global batches. B_ref = {spec.reference_batch_size}; metric `{metric}`, tolerance "
             f"{spec.tolerance:g}. {_mode_text(info['world_size'])}", "",
             f"Base lr: {info['base_lr_text']}. Steps-to-target target: {_num(info['target'])}. "
             f"Sweep wall time {info['wall_seconds']:.0f} s ({info['trained']} runs trained, {info['skipped']} "
             f"skipped as finished).", "", "## Verdict", ""]
    lines += _table(["rule", f"{metric} at B_ref", "holds up to B", "first B outside tolerance",
                     "B within tolerance", "B_simple (B_ref run, end)"],
                    [[v["rule"], _num(v["reference_value"]), _num(v["largest_batch_size"]), _num(v["breaks_at"]),
                      ", ".join(str(b) for b in v["within_tolerance"]) or "–", _num(v["noise_scale"], 3)]
                     for v in verdict_rows])
    tables = [(metric, METRICS[metric][0])]
    if metric != "train_loss":
        tables.append(("final train loss (mean over the last 5 % of samples)", "final_train_loss"))
    for title, key in tables:
        lines += ["", f"## {title}: global batch × rule", ""]
        by = {(r["rule"], r["global_batch_size"]): r for r in main}
        lines += _table(["B"] + rules, [[str(B)] + [_num(by[(rule, B)].get(key)) if (rule, B) in by else "–"
                                                     for rule in rules] for B in spec.batch_sizes])
    lines += ["", "## All points", ""]
    lines += _table(["rule", "B", "W × k × b", "lr", "iterations", "final train loss", "eval loss",
                     "eval accuracy", "steps to target", "B_simple", "wall s", "status"],
                    [_point_cells(r) for r in main])
    grid = [r for r in rows if r["stage"] == "grid"]
    if grid:
        lines += ["", f"## Base-lr grid at B_ref = {spec.reference_batch_size}", ""]
        lines += _table(["lr", metric, "final train loss", "status"],
                        [[_num(r["base_lr"]), _num(metric_value(r, metric)), _num(r["final_train_loss"]), r["status"]]
                         for r in grid])
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in info["plots"]]
    return "\n".join(lines) + "\n"


def _point_cells(r: dict) -> list[str]:
    shape = f"{r['world_size']} × {_num(r['grad_accum_steps'])} × {r['micro_batch_size']}"
    return [r["rule"], str(r["global_batch_size"]), shape, _num(r["scaled_lr"]), _num(r["iterations"]),
            _num(r["final_train_loss"]), _num(r["eval_loss"]), _num(r["eval_accuracy"]), _num(r["steps_to_target"]),
            _num(r["grad_noise_scale"], 3), _num(r["wall_seconds"], 3), r["status"]]


# ---- plots ----------------------------------------------------------------------------------------------
def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def plot_metric_vs_batch(rows: list[dict], verdict_rows: list[dict], spec: SweepSpec, path: Path) -> None:
    """Final metric and final train loss vs global batch, one line per rule, log-2 x; the tolerance band and
    the measured B_simple of each rule's reference run."""
    main = [r for r in rows if r["stage"] == "main"]
    fig, (ax_m, ax_l) = _figure(2)
    for v in verdict_rows:
        pts = sorted((r for r in main if r["rule"] == v["rule"]), key=lambda r: r["global_batch_size"])
        xs = [r["global_batch_size"] for r in pts]
        (line,) = ax_m.plot(xs, [_nan(metric_value(r, spec.metric)) for r in pts], "o-", label=v["rule"])
        ax_l.plot(xs, [_nan(r["final_train_loss"]) for r in pts], "o-", color=line.get_color(), label=v["rule"])
    for i, ref in enumerate(dict.fromkeys(v["reference_value"] for v in verdict_rows if v["reference_value"])):
        ax_m.axhspan(ref - spec.tolerance, ref + spec.tolerance, color="0.85", zorder=0,
                     label=None if i else f"B_ref ± tolerance {spec.tolerance:g}")
    for i, noise in enumerate(dict.fromkeys(v["noise_scale"] for v in verdict_rows if v["noise_scale"])):
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


def plot_loss_vs_samples(rows: list[dict], spec: SweepSpec, path: Path) -> None:
    """Train loss (smoothed) vs samples seen, one panel per rule, one line per global batch size."""
    from matplotlib import colormaps

    main = [r for r in rows if r["stage"] == "main"]
    rules = list(dict.fromkeys(r["rule"] for r in main))
    fig, axes = _figure(len(rules), width=4.5)
    cmap = colormaps["viridis"]
    sizes = spec.batch_sizes
    for ax, rule in zip(axes, rules, strict=True):
        for r in sorted((r for r in main if r["rule"] == rule), key=lambda r: r["global_batch_size"]):
            if not r["_loss_curve"]:
                continue
            xs, ys = zip(*r["_loss_curve"], strict=True)
            color = cmap(sizes.index(r["global_batch_size"]) / max(len(sizes) - 1, 1))
            ax.plot(xs, _smooth(list(ys)), color=color, lw=1.2, label=f"B={r['global_batch_size']}")
        ax.set(xlabel="samples seen", ylabel="train loss (smoothed)", title=rule)
        _log_y(ax)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plot_steps_to_target(rows: list[dict], spec: SweepSpec, target: float | None, path: Path) -> None:
    """Iterations to reach the target metric vs global batch (log-log), in the style of Shallue et al. 2018:
    slope −1 is perfect scaling (dashed, from B_ref); the dotted line is the budget ceil(samples / B)."""
    main = [r for r in rows if r["stage"] == "main"]
    fig, (ax,) = _figure(1, width=6.5)
    Bs = spec.batch_sizes
    ax.plot(Bs, [iterations_for_budget(spec.samples, B) for B in Bs], ":", color="0.5", label="budget (all steps)")
    first = None
    for rule in dict.fromkeys(r["rule"] for r in main):
        pts = sorted((r for r in main if r["rule"] == rule and r["steps_to_target"]),
                     key=lambda r: r["global_batch_size"])
        if pts:
            ax.plot([r["global_batch_size"] for r in pts], [r["steps_to_target"] for r in pts], "o-", label=rule)
            first = first or pts[0]
    if first is not None:
        B0, s0 = first["global_batch_size"], first["steps_to_target"]
        ax.plot(Bs, [s0 * B0 / B for B in Bs], "--", color="0.3", lw=1, label="perfect scaling")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="global batch size B", ylabel="iterations to reach target",
           title=f"steps to {spec.metric} {_num(target)} (missing: not reached)")
    _log_y(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _log_y(ax) -> None:
    """Log y-axis when the plotted data allow it (all-diverged runs leave nothing positive and finite)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if any(math.isfinite(y) and y > 0 for y in ys):
        ax.set_yscale("log")


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _smooth(values: list[float], fraction: float = 0.03) -> list[float]:
    """Trailing moving average over ~3 % of the points (small batches' losses are noisy)."""
    width = max(1, int(len(values) * fraction))
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def write_plots(rows: list[dict], verdict_rows: list[dict], spec: SweepSpec, target: float | None,
                out: Path, warn: Callable[[str], None]) -> list[Path]:
    """The three PNGs (matplotlib, no display needed); skipped with a warning when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warn("matplotlib is not installed (pip install 'ddp_toolkit[plots]'): no plots")
        return []
    plots = {"metric_vs_batch.png": lambda path: plot_metric_vs_batch(rows, verdict_rows, spec, path),
             "loss_vs_samples.png": lambda path: plot_loss_vs_samples(rows, spec, path),
             "steps_to_target.png": lambda path: plot_steps_to_target(rows, spec, target, path)}
    written = []
    for name, plot in plots.items():
        try:
            plot(out / name)
            written.append(out / name)
        except Exception as err:  # a plot never costs the results: csv and md are written regardless
            warn(f"plot {name} failed: {type(err).__name__}: {err}")
    return written


# ---- the sweep ------------------------------------------------------------------------------------------
def _say(text: str) -> None:
    print(text, flush=True)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _run_all(points: list[Point], counter: dict) -> None:
    """Train the points that are not finished (a shared run once) and fill every point's row."""
    for point in points:
        owner = point.same_as or point
        if not owner.row:
            if is_finished(owner):
                counter["skipped"] += 1
                owner.row = collect_row(owner, "finished")
                _say(f"[{owner.stage}] {owner.label}: finished earlier, skipped")
            else:
                t0 = time.perf_counter()
                owner.row = collect_row(owner, run_point(owner))
                counter["trained"] += 1
                _say(f"[{owner.stage}] {owner.label}: {_point_line(owner.row)} ({time.perf_counter() - t0:.1f} s)")
        if point is not owner:
            point.row = {**owner.row, "stage": point.stage, "rule": point.rule}
            _say(f"[{point.stage}] {point.label}: same run as [{owner.stage}] {owner.label}")


def _point_line(row: dict) -> str:
    if row["status"] != "finished":
        return row["status"]
    return (f"W×k×b = {row['world_size']}×{row['grad_accum_steps']}×{row['micro_batch_size']}, "
            f"{row['iterations']} it, train loss {_num(row['final_train_loss'])}, eval acc "
            f"{_num(row['eval_accuracy'])}, B_simple {_num(row['grad_noise_scale'], 3)}")


def better(value: float, other: float, metric: str) -> bool:
    """Strictly better in the metric's direction."""
    return value > other if METRICS[metric][1] else value < other


def _best_lr(grid: list[Point], metric: str) -> tuple[float, str]:
    """The grid lr with the best final metric (the smaller lr on a tie) and a sentence saying so."""
    best: tuple[float, float] | None = None
    for p in sorted(grid, key=lambda p: p.config["optim"]["lr"]):
        value = metric_value(p.row, metric)
        if value is not None and (best is None or better(value, best[1], metric)):
            best = (p.config["optim"]["lr"], value)
    if best is None:
        raise SweepError(f"every lr of the grid failed or diverged at B_ref; see {grid[0].run_dir.parent}")
    tried = ", ".join(f"{p.config['optim']['lr']:g}" for p in grid)
    return best[0], f"{best[0]:g}, best {metric} ({_num(best[1])}) of the grid [{tried}] at B_ref"


def run_sweep(sweep: Sweep, out: Path, world_size: int | None = None) -> dict:
    """Grid (if any), then every point; results.csv, results.md, plots, verdict.json in `out`."""
    spec, W = sweep.spec, _world_size(sweep, world_size)
    out.mkdir(parents=True, exist_ok=True)
    t0, counter = time.perf_counter(), {"trained": 0, "skipped": 0}
    threads = _set_threads(spec.threads)
    try:
        grid = grid_points(sweep, out, W)
        _run_all(grid, counter)
        if grid:
            base_lr, lr_text = _best_lr(grid, spec.metric)
        else:
            base_lr = validate(sweep.base).optim.lr
            lr_text = f"{base_lr:g} (base config; no grid)"
        main = main_points(sweep, out, W, base_lr, grid)
        _run_all(main, counter)
    finally:
        _set_threads(threads)
    rows = [p.row for p in grid + main]
    return _report(sweep, rows, out, {"world_size": W, "base_lr": base_lr, "base_lr_text": lr_text,
                                      "wall_seconds": time.perf_counter() - t0, **counter})


def _set_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    return before


def _report(sweep: Sweep, rows: list[dict], out: Path, info: dict) -> dict:
    spec = sweep.spec
    verdict_rows = verdicts(rows, spec.metric, spec.tolerance)
    target = spec.target
    if target is None:
        refs = {v["rule"] for v in verdict_rows}
        target = default_target([r for r in rows if r["stage"] == "main" and r["rule"] in refs
                                 and r["global_batch_size"] == spec.reference_batch_size], spec.metric)
    for row in rows:
        if target is not None and row["status"] == "finished":
            curve = [(it, v) for it, _, v in _metric_curve(row, spec.metric)]
            row["steps_to_target"] = steps_to_target(curve, target, spec.metric)
    info.update(target=target, plots=write_plots(rows, verdict_rows, spec, target, out, _warn))
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown(sweep, rows, verdict_rows, info))
    result = {"verdicts": verdict_rows, "target": target, "base_lr": info["base_lr"],
              "world_size": info["world_size"], "wall_seconds": info["wall_seconds"], "trained": info["trained"],
              "skipped": info["skipped"], "plots": [p.name for p in info["plots"]],
              "failed": [f"B={r['global_batch_size']} {r['rule']}" for r in rows if r["status"] == "failed"]}
    (out / "verdict.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_verdict(result: dict, metric: str, out: Path) -> None:
    if result.get("failed"):
        _warn(f"{len(result['failed'])} point(s) failed and are left out of the verdict: "
              f"{', '.join(result['failed'])}; see their point.json, then rerun to retry them")
    _say(f"\nverdict ({metric}; W = {result['world_size']}; {result['wall_seconds']:.0f} s):")
    for v in result["verdicts"]:
        _say(f"  {v['rule']}: holds up to B = {_num(v['largest_batch_size'])} (first outside tolerance: "
             f"{_num(v['breaks_at'])}); B_simple of its B_ref run {_num(v['noise_scale'], 3)}")
    _say(f"results: {out / 'results.md'}, {out / 'results.csv'}" +
         "".join(f", {out / p}" for p in result["plots"]))


# ---- command line ---------------------------------------------------------------------------------------
def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """`ddp-toolkit sweep SWEEP.yaml [--out DIR] [--processes W] [--dry-run]`."""
    p = sub.add_parser("sweep", help="train global batch sizes × lr rules on one sample budget; table, plots, "
                                     "verdict")
    p.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file (see configs/sweeps/default.yaml)")
    p.add_argument("--out", help="output directory (default runs/sweeps/<file name>); a rerun skips finished points")
    p.add_argument("--processes", type=int, help="W processes per point under torch.distributed.run (default: the "
                                                 "file's `processes`; 1 trains in this process with accumulation)")
    p.add_argument("--dry-run", action="store_true", help="list the points (and which are finished), train nothing")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep_file)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / sweep.name
    if args.dry_run:
        if sweep.spec.lr_grid:
            _say("main points are listed at the base config's lr; the grid at B_ref picks the lr they train with")
        for p in expand_points(sweep, out, args.processes):
            b = p.config["batch"]
            state = f"same run as {p.same_as.label}" if p.same_as else ("finished" if is_finished(p) else "to train")
            _say(f"[{p.stage}] {p.label}: W={p.world_size} b={b['micro_batch_size']} "
                 f"iterations={p.config['train']['iterations']} lr={p.config['optim']['lr']:g} → {p.run_dir} "
                 f"({state})")
        return 0
    try:
        result = run_sweep(sweep, out, args.processes)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_verdict(result, sweep.spec.metric, out)
    return 0
