"""Typed, validated run configuration: YAML through a safe loader, `key.path=value` overrides.

Every value is checked when the config is built (numbers strictly: no booleans or text for numbers, no NaN or
infinity, integers in range), and every problem becomes one `ConfigError` line naming the key, the value
(shortened) and what is allowed. Each field's docstring is its one-line description: `ddp-toolkit config show`
and docs/config.md are generated from them.

Keys that say the same thing in different units form a group (`EXCLUSIVE_GROUPS`): the last one given wins,
the file in document order first, then the command-line overrides in order.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, Strict, ValidationError, model_validator

from ddp_toolkit.config_types import (
    Bool,
    Count,
    DurationText,
    Factory,
    Float,
    Fraction,
    Int,
    PathText,
    PosInt,
    Seed,
    Text,
    Width,
    _Section,
)
from ddp_toolkit.duration import Duration
from ddp_toolkit.errors import InputError
from ddp_toolkit.names import Decay, EngineName, OptimizerName, ScalingRule
from ddp_toolkit.text import shown
from ddp_toolkit.yaml_io import YamlError, parse_yaml

__all__ = ["Config", "ConfigError", "DEFAULT_CONFIG", "EXCLUSIVE_GROUPS", "apply_overrides", "load_config",
           "load_raw", "validate"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

EXCLUSIVE_GROUPS: dict[str, tuple[str, ...]] = {"train": ("epochs", "iterations", "samples")}
"""Section → keys of which only one may be set; the last one given wins (the others become null)."""


class ConfigError(InputError):
    """A config that cannot be used; the message is one line naming key, value and what is allowed."""


class DataConfig(_Section):
    name: Literal["synthetic", "digits", "text", "custom"] = "synthetic"
    """Built-in data set (`text`: byte sequences of the Python standard library's source), or `custom` with
    `factory`."""
    size: PosInt = 4096
    """Training samples N (synthetic and text; digits has 1437 training samples)."""
    eval_size: Count = 1001
    """Held-out samples for evaluation (synthetic and text; digits uses its 360 held-out samples); 0 for none."""
    features: PosInt = 32
    """Input features of the synthetic set."""
    classes: Int = Field(10, gt=1, le=2**20)
    """Classes of the synthetic set."""
    noise: Float = Field(0.5, ge=0)
    """Label noise of the synthetic set: std of the Gaussian added to the class logits."""
    seed: Seed = 0
    """Seed of the synthetic data (independent of train.seed)."""
    seq_len: Int = Field(128, ge=2, le=2**20)
    """Longest input sequence of the text set, in bytes (sequences are whole lines, of varying length)."""
    factory: Factory | None = None
    """`module:function() -> (train_set, eval_set)` for name=custom; a set may carry an `info` DataInfo."""
    collate: Factory | None = None
    """`module:function(list of samples) -> batch` run on every micro-batch, e.g. ddp_toolkit.data:pad_tokens."""
    order: Literal["global", "distributed_sampler"] = "global"
    """`global`: world-size invariant; `distributed_sampler`: torch's DistributedSampler order with its padding and
    drop_last (full iterations only), NOT world-size invariant: a resume must keep W."""

    @model_validator(mode="after")
    def _custom_needs_factory(self) -> DataConfig:
        if self.name == "custom" and not self.factory:
            raise ValueError("data.name=custom needs data.factory='module:function'")
        return self


class ModelConfig(_Section):
    name: Literal["mlp", "cnn", "linear", "transformer", "custom"] = "mlp"
    """Built-in model (`transformer`: a causal LM on token ids), or `custom` with `factory`."""
    hidden: list[Width] = Field(default_factory=lambda: [64])
    """Hidden widths of the MLP (each in 1 … 2^20)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter dtype; float64 for exact equivalence tests."""
    batchnorm: Bool = False
    """Add BatchNorm to the built-in models (see train.sync_batchnorm)."""
    width: Width = 128
    """Embedding width of the transformer."""
    layers: Int = Field(2, ge=1, le=1024)
    """Transformer blocks."""
    heads: Int = Field(4, ge=1, le=1024)
    """Attention heads of the transformer (dividing model.width)."""
    factory: Factory | None = None
    """`module:function(info) -> nn.Module` for name=custom; info is a ddp_toolkit.data.DataInfo (a factory of
    two positional parameters gets (in_features, num_classes))."""

    @model_validator(mode="after")
    def _custom_needs_factory(self) -> ModelConfig:
        if self.name == "custom" and not self.factory:
            raise ValueError("model.name=custom needs model.factory='module:function'")
        return self


class BatchPhaseConfig(_Section):
    until: DurationText | None = None
    """End of this phase, counted from the start of the run (`20000sp`, `500it`, `2ep`); the last phase has none."""
    global_batch_size: PosInt
    """B of this phase (b·W·k_j: k follows the phase)."""


class BatchRampConfig(_Section):
    start: PosInt
    """First global batch size of the ramp."""
    increment: PosInt
    """Added to the global batch size at each step of the ramp, up to batch.global_batch_size."""
    over: DurationText
    """Length of the whole ramp (Megatron's ramp-up samples); each batch size holds for an equal share of it."""


class BatchConfig(_Section):
    micro_batch_size: PosInt = 32
    """b: samples per device per forward pass."""
    grad_accum_steps: PosInt | None = None
    """k: micro_steps per iteration; derived from global_batch_size when left out (1 when both are)."""
    global_batch_size: PosInt | None = None
    """B = b·W·k; when given, k is derived from the world size W at launch (given both: checked)."""
    drop_last: Bool = False
    """Drop the short last global batch of every epoch."""
    schedule: list[BatchPhaseConfig] | None = None
    """Batch-size schedule: phases `{until, global_batch_size}`, the last without `until`; W and b fixed, k follows
    each phase, the lr follows optim.lr_scaling phase by phase. Replaces global_batch_size and grad_accum_steps."""
    ramp: BatchRampConfig | None = None
    """Batch-size ramp-up `{start, increment, over}` to batch.global_batch_size (Megatron's form of a schedule)."""

    @model_validator(mode="after")
    def _consistent(self) -> BatchConfig:
        b, k, B = self.micro_batch_size, self.grad_accum_steps, self.global_batch_size
        self._check_schedule()
        if B is not None and B % (b * (k or 1)):
            raise ValueError(f"batch.global_batch_size {B} is not divisible by batch.micro_batch_size {b}"
                             + (f" × batch.grad_accum_steps {k}" if k else ""))
        return self

    def _check_schedule(self) -> None:
        if self.schedule is not None and self.ramp is not None:
            raise ValueError("give batch.schedule or batch.ramp, not both")
        if (self.schedule is not None or self.ramp is not None) and self.grad_accum_steps is not None:
            raise ValueError("batch.grad_accum_steps cannot be fixed with a batch-size schedule: k follows each phase")
        if self.schedule is not None:
            if self.global_batch_size is not None:
                raise ValueError("batch.global_batch_size cannot be set with batch.schedule: each phase gives its own")
            if not self.schedule or self.schedule[-1].until is not None:
                raise ValueError("batch.schedule: the last phase must have no `until` (it lasts to the end)")
            for j, phase in enumerate(self.schedule):
                if phase.until is None and j < len(self.schedule) - 1:
                    raise ValueError(f"batch.schedule[{j}]: every phase but the last needs `until`")
                if phase.global_batch_size % self.micro_batch_size:
                    raise ValueError(f"batch.schedule[{j}].global_batch_size {phase.global_batch_size} is not "
                                     f"divisible by batch.micro_batch_size {self.micro_batch_size}")
        if self.ramp is not None and self.global_batch_size is None:
            raise ValueError("batch.ramp needs batch.global_batch_size: the batch size the ramp ends at")

    def sizes(self) -> list[tuple[int, Any]] | None:
        """[(B_j, until_j)] of a batch-size schedule (a ramp expanded, then the final B), or None for a fixed B."""
        if self.schedule is not None:
            return [(p.global_batch_size, p.until) for p in self.schedule]
        if self.ramp is not None:
            from ddp_toolkit.batch_schedule import ramp_phases

            r = self.ramp
            return [*ramp_phases(r.start, r.increment, self.global_batch_size, r.over), (self.global_batch_size, None)]
        return None


class OptimConfig(_Section):
    name: OptimizerName = "sgd"
    """Optimizer; lars and lamb come from pytorch-optimizer."""
    lr: Float = Field(0.1, gt=0)
    """Learning rate at the reference batch optim.base_batch_size."""
    base_batch_size: PosInt | None = None
    """Reference batch B_ref of optim.lr; without it lr_scaling cannot scale (a warning) and lr is used as is."""
    lr_scaling: ScalingRule = "none"
    """Large-batch rule: lr·B/B_ref, lr·sqrt(B/B_ref), or Malladi et al.'s Adam rule."""
    warmup: DurationText | None = 0
    """Gradual warmup length (`500it`, `5ep`, `20000sp`); 0 for none; longer than the run: cut to the run, with
    a note."""
    warmup_start_factor: Float | None = Field(None, ge=0, le=1)
    """Warmup starts at this fraction of the scaled lr; null: at the base lr when a rule scales (Goyal et al.),
    else at 0."""
    schedule: Decay = "constant"
    """Shape of the lr after warmup."""
    decay_fraction: Float = Field(0.2, ge=0, le=1)
    """wsd schedule: the last fraction of the run that decays linearly to min_lr (Hägele et al. 2024)."""
    step_milestones: list[DurationText] = Field(default_factory=list)
    """Durations at which `step` decay multiplies the lr by step_gamma; those past the end of the run are
    dropped, with a note."""
    step_gamma: Float = Field(0.1, gt=0, le=1)
    """Factor applied to the lr at each step milestone."""
    min_lr: Float = Field(0.0, ge=0)
    """End of the cosine decay and floor of the step decay."""
    momentum: Float = Field(0.9, ge=0, lt=1)
    """SGD / LARS momentum."""
    weight_decay: Float = Field(0.0, ge=0)
    """Weight decay λ at the reference batch; scaled only with optim.weight_decay_scaling."""
    weight_decay_scaling: Bool = False
    """Keep AdamW's decay timescale fixed in samples: λ' = λ·(B/B_ref)·lr/scaled lr (Wang & Aitchison 2024)."""
    beta2_scaling: Bool = False
    """Keep Adam's β2 half-life fixed in samples: β2' = β2^(B/B_ref) (Busbridge et al. 2023; Marek et al. 2025)."""
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    """Adam / AdamW / LAMB betas, each in [0, 1)."""
    eps: Float = Field(1e-8, gt=0)
    """Adam / AdamW / LAMB epsilon."""
    grad_clip: Float | None = Field(None, gt=0)
    """Clip the global gradient norm (after the sync) to this value."""


class FSDPConfig(_Section):
    shard_modules: list[Annotated[str, Strict(), Field(min_length=1, max_length=256)]] = Field(default_factory=list)
    """Module class names sharded as one FSDP group each (e.g. [TransformerBlock]); empty: every submodule of at
    least min_params parameters, then the root."""
    min_params: PosInt = 100_000
    """Parameter threshold of the default grouping (shard_modules empty)."""
    reshard_after_forward: Bool = True
    """Free the gathered parameters of each group after its forward (gathered again in backward): less memory,
    one more all-gather per group and micro-step."""


class TrainConfig(_Section):
    epochs: Float | None = Field(None, gt=0)
    """Stop after this many epochs (one of epochs / iterations / samples, the last one given wins; default 2
    epochs)."""
    iterations: PosInt | None = None
    """Stop after this many iterations (optimizer steps)."""
    samples: PosInt | None = None
    """Stop once samples_seen reaches this many samples."""
    seed: Seed = 0
    """Seed of model init, data order and every rank's RNG (0 … 2^32−1)."""
    engine: EngineName = "auto"
    """Gradient-sync engine; auto picks it from the launcher (fsdp: FSDP2, sharded parameters, never auto)."""
    log_every: PosInt = 10
    """Write metrics every this many iterations (and at the last one)."""
    eval_every: DurationText | None = None
    """Evaluate every this duration (`1ep`, `200it`); always at the end when an eval set exists."""
    checkpoint_every: DurationText | None = None
    """Checkpoint every this duration; always at the end."""
    keep_checkpoints: PosInt = 2
    """Newest checkpoints kept in run_dir/checkpoints."""
    resume: PathText = "never"
    """`never`, `auto` (latest valid checkpoint in run_dir) or a checkpoint directory."""
    sync_batchnorm: Bool = False
    """Convert BatchNorm to SyncBatchNorm (statistics over the devices of one micro_step); CUDA only (torch's
    SyncBatchNorm refuses CPU tensors), and not with precision=bf16 until a GPU test covers it."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision of the forward and backward passes."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite gradient: checkpoint the last good state and stop, or skip that update on every rank."""
    noise_scale: Bool = False
    """Estimate the gradient noise scale B_simple from local and global gradients."""
    noise_scale_finite_n: Bool = False
    """Log grad_noise_scale corrected for sampling without replacement from N (it reads high as B_simple nears N)."""
    deepspeed_config: PathText | None = None
    """DeepSpeed JSON; checked against the plan (train_batch_size etc.)."""
    zero_stage: Int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage when no JSON gives one."""
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    """FSDP2 settings (train.engine=fsdp)."""
    halt_at: PosInt | None = None
    """Checkpoint and stop after this iteration (resume later with train.resume=auto)."""
    allow_config_change: Bool = False
    """Resume even if global batch, dataset size or seed differ from the checkpoint's."""
    dist_timeout_s: Float = Field(600, gt=0)
    """Timeout of the process group's rendezvous and collectives, in seconds."""
    num_workers: Int = Field(0, ge=0, le=1024)
    """DataLoader worker processes per rank."""
    pin_memory: Bool | None = None
    """DataLoader pinned host memory (faster host-to-GPU copies); default true on CUDA, false on CPU."""
    prefetch_factor: Int | None = Field(None, ge=1, le=1024)
    """Micro-batches each DataLoader worker loads ahead (num_workers > 0 only; default torch's 2)."""
    persistent_workers: Bool = False
    """Keep the DataLoader workers alive between epochs (num_workers > 0 only)."""
    compile: Bool = False
    """torch.compile the model before the engine wraps it (first iterations slower; eager when false)."""
    deterministic: Bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic, no benchmark, no TF32,
    CUBLAS_WORKSPACE_CONFIG): with it a resume is bit-identical to the uninterrupted run on CUDA too; without it
    bit-identical on CPU only (on CUDA, atomics-based kernels may differ in the last bits)."""
    tf32: Bool | None = None
    """TensorFloat-32 matmuls and convolutions on CUDA (faster, ~10-bit mantissa); default torch's own."""
    loss: Literal["cross_entropy", "token_cross_entropy", "mse", "custom"] = "cross_entropy"
    """Per-item loss: per sample (cross_entropy, mse), per token (token_cross_entropy), or custom with
    loss_factory; the update is its exact mean over the items of the global batch."""
    ignore_index: Int = Field(-100, ge=-(2**31), le=2**31 - 1)
    """Label of a position that is no item (padding): out of the loss and of the count (token_cross_entropy)."""
    causal_shift: Bool = False
    """Dict batches: score logits[:, :-1] against labels[:, 1:] (Hugging Face causal LMs, labels = input_ids)."""
    loss_factory: Factory | None = None
    """`module:function(info) -> per-item loss function or Step` for loss=custom (see ddp_toolkit.step)."""

    @model_validator(mode="after")
    def _custom_needs_factory(self) -> TrainConfig:
        if self.loss == "custom" and not self.loss_factory:
            raise ValueError("train.loss=custom needs train.loss_factory='module:function'")
        return self

    @model_validator(mode="before")
    @classmethod
    def _last_stop_wins(cls, data: Any) -> Any:
        return _last_of_group(data, EXCLUSIVE_GROUPS["train"])

    def __setattr__(self, name: str, value: Any) -> None:
        """Setting one run length clears the others: the last one given wins here too."""
        if name in EXCLUSIVE_GROUPS["train"] and value is not None:
            for other in EXCLUSIVE_GROUPS["train"]:
                if other != name and getattr(self, other) is not None:
                    super().__setattr__(other, None)
        super().__setattr__(name, value)

    @property
    def stop(self) -> Duration:
        """The length of the run: train.iterations, train.samples or train.epochs (2 epochs when none is given)."""
        if self.iterations is not None:
            return Duration.iterations(self.iterations)
        if self.samples is not None:
            return Duration.samples(self.samples)
        return Duration.epochs(self.epochs if self.epochs is not None else 2.0)


class ReportConfig(_Section):
    console: Bool = True
    """Live progress and the plan table on the console (rank 0)."""
    jsonl: Bool = True
    """Write run_dir/metrics.jsonl."""
    wandb: Bool = False
    """Log to Weights & Biases (needs the wandb extra); one wandb run per run_dir, resumed with the training."""
    wandb_project: Text = "ddp_toolkit"
    """wandb project name."""
    tensorboard: Bool = False
    """Write TensorBoard event files to run_dir/tensorboard (needs the tensorboard extra)."""
    mlflow: Bool = False
    """Log to MLflow (needs the mlflow extra); one MLflow run per run_dir, resumed with the training."""
    mlflow_tracking_uri: PathText | None = None
    """MLflow tracking URI (default: a SQLite store in run_dir/mlflow.db)."""
    mlflow_experiment: Text = "ddp_toolkit"
    """MLflow experiment name."""
    run_name: Text | None = None
    """Tracker run name for wandb and MLflow (default: the name of run_dir)."""
    tags: list[Text] = Field(default_factory=list)
    """Tracker tags for wandb and MLflow."""
    flops: Bool = True
    """Count the FLOPs of one micro-step at the start; log flops_per_second (and mfu when the peak is known)."""
    peak_flops: Float | None = Field(None, gt=0)
    """Peak FLOP/s of one device for mfu (default: bf16 dense peak of a known GPU; none on CPU)."""


class Config(_Section):
    """One training run: data → model → batch plan → optimizer → loop → reports."""

    run_dir: PathText = "runs/default"
    """Where plan.json, metrics.jsonl, checkpoints/ and final/ go."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training and evaluation data."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The network."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """The batch plan: B = b·W·k."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer, large-batch lr rule and schedule."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Run length, cadences, resume and engine."""
    report: ReportConfig = Field(default_factory=ReportConfig)
    """Where the metrics go."""


def _last_of_group(data: Any, group: tuple[str, ...]) -> Any:
    """Keep only the last key of `group` that is set (mapping order is the order given); null the others."""
    if not isinstance(data, dict):
        return data
    given = [key for key in data if key in group and data[key] is not None]
    if len(given) <= 1:
        return data
    return {key: (None if key in given[:-1] else value) for key, value in data.items()}


def _dotted(loc: tuple) -> str:
    """The config key of a pydantic error location, without the union-member tags pydantic adds."""
    model: Any = Config
    parts: list[str] = []
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if isinstance(part, int):
            parts.append(str(part))
        elif fields is not None and part in fields:
            parts.append(part)
            model = fields[part].annotation
        elif fields is not None:
            parts.append(str(part))  # an unknown key
            model = None
    return ".".join(parts)


def _format_error(err: ValidationError) -> str:
    """One line: the first problem, with its dotted key, the value given (shortened) and what is allowed."""
    first = err.errors()[0]
    key = _dotted(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        section, _, name = key.rpartition(".")
        model = Config if not section else _section_model(section)
        near = difflib.get_close_matches(name, list(getattr(model, "model_fields", {})), n=1)
        hint = f" (did you mean {'.'.join(filter(None, [section, near[0]]))!r}?)" if near else ""
        return f"unknown key {shown(key)}{hint}"
    if not key:
        return msg
    given = first.get("input")
    return f"{key}: {msg} (got {shown(given)})" if not isinstance(given, dict) else f"{key}: {msg}"


def _section_model(section: str) -> Any:
    field = Config.model_fields.get(section)
    return field.annotation if field is not None else None


def validate(raw: dict) -> Config:
    """Build a Config from a plain dict, raising one ConfigError line on the first problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars: `0.1`, `1e-3`, `true`, `[64, 64]`, `5ep`; text that is not YAML stays
    text."""
    try:
        return parse_yaml(text)
    except YamlError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides to a raw config dict (a new dict; the original is not touched).

    An override goes to the end of its section's order, so within an exclusive group it is the last one given.
    """
    out = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {shown(item)} is not of the form key.path=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {shown(item)}: {shown(part)} is not a section")
        node.pop(parts[-1], None)
        node[parts[-1]] = _parse_value(value)
    return out


def load_raw(path: str | Path) -> dict:
    """Read a UTF-8 YAML mapping with a safe loader that refuses duplicate keys; any problem is one line."""
    path = Path(path)
    where = f"config file {shown(str(path))}"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {where}: {err.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") \
            from None
    try:
        raw = parse_yaml(text)
    except YamlError as err:
        raise ConfigError(f"{where} is not valid YAML{err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, got a {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (the default config when path is None), apply overrides, validate."""
    raw = load_raw(path if path is not None else DEFAULT_CONFIG)
    return validate(apply_overrides(raw, list(overrides or [])))
