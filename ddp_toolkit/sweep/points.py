"""The points of a sweep: each point's run config derives from the one validated base `Config`.

One point per (global batch size B, rule, seed), every point on the same sample budget: ceil(samples / B)
iterations of full batches (drop_last), so a larger batch takes proportionally fewer steps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ValidationError

from ddp_toolkit.config import Config, ConfigError
from ddp_toolkit.lr import scaled_lr
from ddp_toolkit.plan import parse_duration
from ddp_toolkit.sweep.spec import RuleSpec, Sweep, error_line

__all__ = ["Point", "iterations_for_budget", "micro_batch_for", "point_config", "grid_points", "main_points",
           "expand_points", "world_size_for"]

Stage = Literal["grid", "main"]
S = TypeVar("S", bound=BaseModel)


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
    """One training run of the sweep: a rule (or a grid lr) at one global batch size, with one seed."""

    stage: Stage
    rule: str
    global_batch_size: int
    world_size: int
    config: Config
    """The validated run config; config.run_dir is where it writes."""
    seed: int | None = None
    """train.seed when the sweep repeats points over seeds (None: one run, the base config's seed)."""
    same_as: Point | None = None
    """An earlier point with the same effective config: this one reuses its run."""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @property
    def label(self) -> str:
        seed = f" seed={self.seed}" if self.seed is not None else ""
        return f"B={self.global_batch_size} {self.rule}{seed}"

    def fingerprint(self) -> dict:
        """What makes two runs the same: the config without run_dir and reports, and W."""
        cfg = self.config.model_dump(mode="json", exclude={"run_dir", "report"})
        return json.loads(json.dumps({"config": cfg, "world_size": self.world_size}, sort_keys=True))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "rule"


def _section(section: S, drop: tuple[str, ...] = (), **changes) -> S:
    """A validated copy of a config section: the fields given in the base minus `drop` (back to their
    defaults), with `changes` applied."""
    kept = {k: v for k, v in section.model_dump(exclude_unset=True).items() if k not in drop}
    try:
        return type(section).model_validate({**kept, **changes})
    except ValidationError as err:
        raise ConfigError(f"sweep point: {type(section).__name__}: {error_line(err)}") from None


def _optim_changes(sweep: Sweep, B: int, lr: float, rule: RuleSpec | None) -> dict:
    """lr, B_ref and the rule; the warmup only where it changes the run.

    At B_ref every rule gives the base lr, and a warmup that starts at the peak is no warmup: both are
    normalised away, so runs that are the same have the same config (and are trained once).
    """
    B_ref = sweep.spec.reference_batch_size
    rule_name = rule.lr_scaling if rule and B != B_ref else "none"
    changes: dict = {"lr": lr, "base_batch_size": B_ref, "lr_scaling": rule_name}
    if rule is not None and rule.optimizer:
        changes["name"] = rule.optimizer
    factor = scaled_lr(lr, B, B_ref, rule_name) / lr
    base_start = 1.0 / factor if factor >= 1 else 1.0  # Goyal et al.: the warmup starts at the unscaled lr
    start = base_start if rule is None or rule.warmup_start == "base" else rule.warmup_start
    if rule is not None and parse_duration(rule.warmup).value > 0 and start < 1.0:
        changes.update(warmup=rule.warmup, warmup_start_factor=start)
    return changes


def point_config(sweep: Sweep, B: int, lr: float, rule: RuleSpec | None, run_dir: Path, world_size: int,
                 seed: int | None = None) -> Config:
    """The run config of one point: budget → iterations, B and b, the rule's lr, warmup and optimizer."""
    spec, base = sweep.spec, sweep.base
    iterations = iterations_for_budget(spec.samples, B)
    cap = spec.micro_batch_size or base.batch.micro_batch_size
    ramp = rule.batch_ramp if rule is not None and rule.batch_ramp and B > rule.batch_ramp.start else None
    two = spec.noise_scale and world_size == 1  # k >= 2 in every phase: b divides the ramp's first batch
    b = micro_batch_for(ramp.start if ramp else B, world_size, cap, two_micro_steps=two)
    ramped = {} if ramp is None else {"ramp": {"start": ramp.start, "increment": ramp.start, "over": ramp.over}}
    batch = _section(base.batch, ("grad_accum_steps", "schedule", "ramp"), micro_batch_size=b, global_batch_size=B,
                     drop_last=True, **ramped)
    optim = _section(base.optim, ("warmup", "warmup_start_factor"), **_optim_changes(sweep, B, lr, rule))
    seeded = {} if seed is None else {"seed": seed}
    length = {"iterations": iterations} if ramp is None else {"samples": spec.samples}  # a ramp: the same budget
    train = _section(base.train, ("epochs", "samples", "iterations", "halt_at", "checkpoint_every", "resume"),
                     **length, log_every=max(1, iterations // 500),
                     eval_every=max(1, iterations // spec.evals), noise_scale=spec.noise_scale, **seeded)
    report = _section(base.report, console=False, jsonl=True)
    return base.model_copy(update={"batch": batch, "optim": optim, "train": train, "report": report,
                                   "run_dir": str(run_dir)})


def _seeds(sweep: Sweep) -> list[int | None]:
    return list(sweep.spec.seeds) or [None]


def _seed_dir(run_dir: Path, seed: int | None) -> Path:
    return run_dir if seed is None else run_dir.with_name(f"{run_dir.name}-s{seed}")


def grid_points(sweep: Sweep, out: Path, world_size: int) -> list[Point]:
    """The lr grid at B_ref: rule none, no warmup, the base optimizer; every lr with every seed."""
    B = sweep.spec.reference_batch_size
    return [Point("grid", f"lr={lr:g}", B, world_size,
                  point_config(sweep, B, lr, None, _seed_dir(out / "grid" / f"lr{lr:g}", seed), world_size, seed),
                  seed)
            for lr in sweep.spec.lr_grid for seed in _seeds(sweep)]


def main_points(sweep: Sweep, out: Path, world_size: int, base_lr: float, done: list[Point] = ()) -> list[Point]:
    """One point per (rule, B, seed); a point whose config equals an earlier one's (in `done` or here) reuses
    its run."""
    seen = {json.dumps(p.fingerprint(), sort_keys=True): p for p in done if p.same_as is None}
    points = []
    for rule in sweep.spec.rules:
        for B in sweep.spec.batch_sizes:
            for seed in _seeds(sweep):
                run_dir = _seed_dir(out / "points" / _slug(rule.name) / f"B{B:05d}", seed)
                cfg = point_config(sweep, B, rule.lr or base_lr, rule, run_dir, world_size, seed)
                point = Point("main", rule.name, B, world_size, cfg, seed)
                key = json.dumps(point.fingerprint(), sort_keys=True)
                point.same_as = seen.get(key)
                if point.same_as is not None:
                    point.config = cfg.model_copy(update={"run_dir": point.same_as.config.run_dir})
                else:
                    seen[key] = point
                points.append(point)
    return points


def expand_points(sweep: Sweep, out: Path, world_size: int | None = None, base_lr: float | None = None
                  ) -> list[Point]:
    """Every point of the sweep without training (grid, then main points at `base_lr`, default the base lr)."""
    W = world_size_for(sweep, world_size)
    grid = grid_points(sweep, out, W)
    lr = base_lr if base_lr is not None else sweep.base.optim.lr
    return grid + main_points(sweep, out, W, lr, grid)


def world_size_for(sweep: Sweep, processes: int | None) -> int:
    """--processes (or the file's `processes`), checked against every global batch."""
    W = processes or sweep.spec.processes
    if W < 1:
        raise ConfigError(f"--processes must be >= 1, got {W}")
    bad = [B for B in sweep.spec.batch_sizes if B % W]
    if bad:
        raise ConfigError(f"--processes {W} does not divide global batch {bad[0]}; use a W that divides every "
                          f"batch size in {sweep.spec.batch_sizes}")
    return W
