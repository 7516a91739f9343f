"""The sweep file: a pydantic schema, the base run config validated once, and the checks across fields."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ddp_toolkit.config import Config, ConfigError, load_raw, validate
from ddp_toolkit.names import OptimizerName, ScalingRule
from ddp_toolkit.plan import BatchPlan, parse_duration

__all__ = ["METRICS", "Metric", "RampSpec", "RuleSpec", "SweepSpec", "Sweep", "sweep_from_dict", "load_sweep",
           "higher_is_better", "error_line"]

Metric = Literal["eval_accuracy", "eval_loss", "train_loss"]
METRICS: tuple[str, ...] = get_args(Metric)
HIGHER_IS_BETTER = {"eval_accuracy"}
"""Metrics that improve upwards; the others are losses."""
BUILTIN_TRAIN_SIZE = {"digits": 1437}


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def error_line(err: ValidationError) -> str:
    """The first problem of a sweep-file validation as one line: dotted key, message, the value given."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    msg = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    if not key or isinstance(given, dict):
        return f"{key}: {msg}" if key else msg
    text = repr(given)
    return f"{key}: {msg} (got {text if len(text) <= 80 else text[:77] + '...'})"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RampSpec(_Model):
    """A batch-size ramp-up (Megatron's form): B = start, 2·start, … up to the point's B, each for an equal share
    of `over`; points whose B is not above `start` run at a fixed B."""

    start: int = Field(gt=0)
    """First global batch size of the ramp (the increment too); every larger point's B must be a multiple of it."""
    over: str | int
    """Length of the whole ramp (`20000sp`, `1ep`, `100it`)."""

    @field_validator("over")
    @classmethod
    def _duration(cls, value: str | int) -> str | int:
        parse_duration(value)
        return value


class RuleSpec(_Model):
    """One large-batch rule: how the base lr tuned at B_ref becomes the lr at B."""

    name: str = Field(min_length=1)
    """Label in tables and plots."""
    lr_scaling: ScalingRule = "none"
    warmup: str | int = 0
    """Gradual warmup (`20000sp`, `2ep`, `100it`); samples or epochs keep the same share of every run."""
    warmup_start: float | Literal["base"] = "base"
    """First warmup step's fraction of the scaled lr; `base` starts at the unscaled lr (Goyal et al.)."""
    optimizer: OptimizerName | None = None
    """Optimizer of this rule (default: the base config's)."""
    lr: float | None = Field(None, gt=0)
    """Base lr at B_ref for this rule (e.g. LARS, whose trust ratio needs a larger one); default: tuned."""
    batch_ramp: RampSpec | None = None
    """A batch-size schedule as a rule: each point ramps its batch up to B (the lr follows lr_scaling per phase)."""

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
    metric: Metric = "eval_accuracy"
    lr_grid: list[float] = Field(default_factory=list)
    """Base lrs tried at B_ref (rule none, no warmup); the best by metric is used by every rule."""
    seeds: list[int] = Field(default_factory=list)
    """train.seed of the repeated runs of every point (default: the base config's seed, one run); with two or
    more the results are means with 95 % t-intervals and the verdict uses the interval of the difference."""
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

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
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
    """A loaded sweep: the validated spec, the base run config (validated once) and where the file was."""

    spec: SweepSpec
    base: Config
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.path else "sweep"

    @property
    def seeds(self) -> list[int]:
        """The seeds every point runs with (the base config's alone when the file names none)."""
        return self.spec.seeds or [self.base.train.seed]


def sweep_from_dict(raw: Any, path: Path | None = None) -> Sweep:
    """Validate a sweep mapping and its base config; one ConfigError line on the first problem."""
    where = f"sweep file {str(path)!r}" if path else "sweep"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping, got a {type(raw).__name__}")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{where}: {error_line(err)}") from None
    if isinstance(spec.base, str):
        base_path = Path(spec.base)
        if not base_path.is_absolute() and path is not None:
            base_path = path.parent / base_path
        base_raw = load_raw(base_path)
    else:
        base_raw = spec.base
    try:
        base = validate(base_raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: base: {err}") from None
    sweep = Sweep(spec, base, path)
    _check_consistent(sweep, where)
    return sweep


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep YAML file (see `SweepSpec`)."""
    path = Path(path)
    return sweep_from_dict(load_raw(path), path)


def train_size(base: Config) -> int | None:
    """N of the built-in data sets (None for custom data)."""
    if base.data.name == "synthetic":
        return base.data.size
    return BUILTIN_TRAIN_SIZE.get(base.data.name)


def _check_consistent(sweep: Sweep, where: str) -> None:
    """What the fields cannot check alone: W divides B, B fits the data, warmups fit the runs, an eval set."""
    from ddp_toolkit.sweep.points import iterations_for_budget

    spec, W, data = sweep.spec, sweep.spec.processes, sweep.base.data
    for B in spec.batch_sizes:
        if B % W:
            raise ConfigError(f"{where}: batch_sizes: global batch {B} is not divisible by processes {W}")
    n = train_size(sweep.base)
    if n is not None and spec.batch_sizes[-1] > n:
        raise ConfigError(f"{where}: batch_sizes: global batch {spec.batch_sizes[-1]} is larger than the "
                          f"{n} training samples (points drop the short last batch)")
    if spec.metric.startswith("eval_") and data.name == "synthetic" and data.eval_size == 0:
        raise ConfigError(f"{where}: metric: {spec.metric} needs an eval set, but base data.eval_size is 0")
    for i, rule in enumerate(spec.rules):
        ramp = rule.batch_ramp
        wrong = [B for B in spec.batch_sizes if ramp is not None and B > ramp.start and B % ramp.start]
        if wrong:
            raise ConfigError(f"{where}: rules.{i}.batch_ramp: global batch {wrong[0]} is not a multiple of start "
                              f"{ramp.start} (the ramp grows by start at each step)")
        if ramp is not None and n is not None:
            _check_ramp(sweep, i, n, where)
        for B in spec.batch_sizes:
            warmup, total = _warmup_iterations(rule.warmup, B, n), iterations_for_budget(spec.samples, B)
            if warmup is not None and warmup > total:
                raise ConfigError(f"{where}: rules.{i}.warmup: {rule.warmup!r} is {warmup} iterations at global "
                                  f"batch {B}, longer than its run of {total} iterations")


def _check_ramp(sweep: Sweep, index: int, n: int, where: str) -> None:
    """Plan every point of a ramp rule as the trainer will: a ramp too short for its batches leaves a phase without
    an iteration, which would fail that point mid-sweep, after the points before it have trained."""
    from ddp_toolkit.plan import PlanError
    from ddp_toolkit.recipe import batch_schedule_for
    from ddp_toolkit.sweep.points import point_config

    rule, W = sweep.spec.rules[index], sweep.spec.processes
    for B in sweep.spec.batch_sizes:
        if B > rule.batch_ramp.start:
            cfg = point_config(sweep, B, sweep.base.optim.lr, rule, Path(sweep.base.run_dir), W)
            try:
                batch_schedule_for(cfg, n, W)
            except (PlanError, ConfigError) as err:
                raise ConfigError(f"{where}: rules.{index}.batch_ramp: at global batch {B}: {err} (a longer `over` "
                                  f"or a larger `start` gives each phase an iteration)") from None


def _warmup_iterations(warmup: str | int, B: int, n: int | None) -> int | None:
    """The warmup in iterations at global batch B, as the trainer converts it (None: epochs of unknown N)."""
    if n is not None:
        return BatchPlan(dataset_size=n, micro_batch_size=B, world_size=1, drop_last=True).iterations_in(warmup)
    duration = parse_duration(warmup)
    if duration.unit == "ep":
        return None
    return int(duration.value) if duration.unit == "it" else -(-int(duration.value) // B)
