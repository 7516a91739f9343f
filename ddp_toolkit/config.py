"""Typed, validated run configuration: YAML through `yaml.safe_load`, `key.path=value` overrides.

Every problem becomes one `ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddp_toolkit.errors import InputError
from ddp_toolkit.duration import Duration

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(InputError):
    """A config that cannot be used; the message is one line naming key, value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _duration(value: Any) -> str | int | None:
    """Accept `500`, `500it`, `5ep`, `20000sp` (validated now, converted through the plan later)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500it, 5ep or 20000sp, got {value!r}")
    Duration.parse(value)
    return value


class DataConfig(_Section):
    name: Literal["synthetic", "digits", "custom"] = "synthetic"
    """Built-in data set, or `custom` with `factory`."""
    size: int = Field(4096, gt=0)
    """Training samples N (synthetic only; digits has 1437 training samples)."""
    eval_size: int = Field(1001, ge=0)
    """Held-out samples for evaluation (synthetic only; digits uses its 360 held-out samples)."""
    features: int = Field(32, gt=0)
    """Input features of the synthetic set."""
    classes: int = Field(10, gt=1)
    """Classes of the synthetic set."""
    noise: float = Field(0.5, ge=0)
    """Label noise of the synthetic set: std of the Gaussian added to the class logits."""
    seed: int = 0
    """Seed of the synthetic data (independent of train.seed)."""
    factory: str | None = None
    """`module:function` returning (train_set, eval_set) for name=custom."""

    @model_validator(mode="after")
    def _custom_needs_factory(self) -> DataConfig:
        if self.name == "custom" and not self.factory:
            raise ValueError("data.name=custom needs data.factory='module:function'")
        return self


class ModelConfig(_Section):
    name: Literal["mlp", "cnn", "linear", "custom"] = "mlp"
    """Built-in model, or `custom` with `factory`."""
    hidden: list[int] = Field(default_factory=lambda: [64])
    """Hidden widths of the MLP."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter dtype; float64 for exact equivalence tests."""
    batchnorm: bool = False
    """Add BatchNorm to the built-in models (see train.sync_batchnorm)."""
    factory: str | None = None
    """`module:function(in_features, num_classes) -> nn.Module` for name=custom."""

    @model_validator(mode="after")
    def _custom_needs_factory(self) -> ModelConfig:
        if self.name == "custom" and not self.factory:
            raise ValueError("model.name=custom needs model.factory='module:function'")
        return self


class BatchConfig(_Section):
    micro_batch_size: int = Field(32, gt=0)
    """b: samples per device per forward pass."""
    grad_accum_steps: int | None = Field(None, gt=0)
    """k: micro_steps per iteration; derived from global_batch_size when left out."""
    global_batch_size: int | None = Field(None, gt=0)
    """B = b·W·k; when given, k is derived from the world size at launch."""
    drop_last: bool = False
    """Drop the short last global batch of every epoch."""

    @model_validator(mode="after")
    def _consistent(self) -> BatchConfig:
        b, k, B = self.micro_batch_size, self.grad_accum_steps, self.global_batch_size
        if B is not None and B % (b * (k or 1)):
            raise ValueError(f"batch.global_batch_size {B} is not divisible by batch.micro_batch_size {b}"
                             + (f" × batch.grad_accum_steps {k}" if k else ""))
        return self


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw", "lars", "lamb"] = "sgd"
    lr: float = Field(0.1, gt=0)
    """Learning rate at the reference batch optim.base_batch_size."""
    base_batch_size: int | None = Field(None, gt=0)
    """Reference batch B_ref of optim.lr; defaults to the run's global batch (no scaling)."""
    lr_scaling: Literal["none", "linear", "sqrt", "adam_sqrt"] = "none"
    """Large-batch rule: lr·B/B_ref, lr·sqrt(B/B_ref), or Malladi et al.'s Adam rule."""
    warmup: str | int | None = 0
    """Gradual warmup length (`500it`, `5ep`, `20000sp`); 0 for none."""
    warmup_start_factor: float = Field(0.0, ge=0, le=1)
    """Warmup starts at this fraction of the scaled lr (Goyal et al. start at base/scaled)."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_milestones: list[str | int] = Field(default_factory=list)
    """Durations at which `step` decay multiplies the lr by step_gamma."""
    step_gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    """Not scaled with the batch size (Goyal et al. 2017)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    """Clip the global gradient norm (after the sync) to this value."""

    @field_validator("warmup")
    @classmethod
    def _warmup_duration(cls, value: Any) -> str | int | None:
        return _duration(value)

    @field_validator("step_milestones")
    @classmethod
    def _milestones(cls, value: list) -> list:
        return [_duration(v) for v in value]


class TrainConfig(_Section):
    epochs: float | None = Field(None, gt=0)
    """Stop after this many epochs (one of epochs / iterations / samples; default 2 epochs)."""
    iterations: int | None = Field(None, gt=0)
    """Stop after this many iterations (optimizer steps)."""
    samples: int | None = Field(None, gt=0)
    """Stop once samples_seen reaches this many samples."""
    seed: int = 0
    """Seed of model init, data order and every rank's RNG."""
    engine: Literal["auto", "ddp", "accelerate", "deepspeed"] = "auto"
    log_every: int = Field(10, gt=0)
    """Write metrics every this many iterations (and at the last one)."""
    eval_every: str | int | None = None
    """Evaluate every this duration (`1ep`, `200it`); always at the end when an eval set exists."""
    checkpoint_every: str | int | None = None
    """Checkpoint every this duration; always at the end."""
    keep_checkpoints: int = Field(2, gt=0)
    resume: str = "never"
    """`never`, `auto` (latest valid checkpoint in run_dir) or a checkpoint directory."""
    sync_batchnorm: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    on_nonfinite: Literal["stop", "skip"] = "stop"
    noise_scale: bool = False
    """Estimate the gradient noise scale B_simple from local and global gradients."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON; checked against the plan (train_batch_size etc.)."""
    zero_stage: int = Field(0, ge=0, le=3)
    halt_at: int | None = Field(None, gt=0)
    """Checkpoint and stop after this iteration (resume later with train.resume=auto)."""
    allow_config_change: bool = False
    """Resume even if global batch, dataset size or seed differ from the checkpoint's."""
    dist_timeout_s: float = Field(600, gt=0)
    """Timeout of the process group's rendezvous and collectives: a hung peer becomes an error (and a restart
    under --max-restarts) after this long."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank."""

    @field_validator("eval_every", "checkpoint_every")
    @classmethod
    def _durations(cls, value: Any) -> str | int | None:
        return _duration(value)

    @model_validator(mode="after")
    def _one_stop(self) -> TrainConfig:
        given = [n for n in ("epochs", "iterations", "samples") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of train.epochs / train.iterations / train.samples, got "
                             f"{', '.join(given)}")
        return self

    @property
    def stop(self) -> Duration:
        """The length of the run: train.iterations, train.samples or train.epochs (2 epochs when none is given)."""
        if self.iterations is not None:
            return Duration.iterations(self.iterations)
        if self.samples is not None:
            return Duration.samples(self.samples)
        return Duration.epochs(self.epochs if self.epochs is not None else 2.0)


class ReportConfig(_Section):
    console: bool = True
    jsonl: bool = True
    wandb: bool = False
    wandb_project: str = "ddp_toolkit"
    run_name: str | None = None
    tags: list[str] = Field(default_factory=list)


class Config(_Section):
    """One training run: data → model → batch plan → optimizer → loop → reports."""

    run_dir: str = "runs/default"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def _format_error(err: ValidationError) -> str:
    """One line: the first problem, with its dotted key, the value given and what is allowed."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if not key:
        return msg
    given = first.get("input")
    return f"{key}: {msg} (got {given!r})" if not isinstance(given, dict) else f"{key}: {msg}"


def validate(raw: dict) -> Config:
    """Build a Config from a plain dict, raising one ConfigError line on the first problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars: `0.1`, `true`, `[64, 64]`, `5ep`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides to a raw config dict (a new dict; keys must exist in Config)."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return out


def load_raw(path: str | Path) -> dict:
    """Read a YAML mapping with safe_load; a missing or unreadable file is one ConfigError line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{line}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got a "
                          f"{type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (the default config when path is None), apply overrides, validate."""
    raw = load_raw(path if path is not None else DEFAULT_CONFIG)
    return validate(apply_overrides(raw, list(overrides or [])))
