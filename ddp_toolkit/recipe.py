"""From a validated config to the parts of a run: the batch plan, the lr schedule, the optimizer, the run's
fingerprint, the preflight check, and `train_from_config` (built-in data and models).

Everything here is a function of (config, dataset size, world size), so the CLI can check a run before any
worker starts and the trainer builds exactly what was checked.
"""

from __future__ import annotations

from typing import Any

from ddp_toolkit.batch_schedule import BatchSchedule
from ddp_toolkit.config import Config, ConfigError
from ddp_toolkit.config_plan import milestone_iterations, reference_batch, scaling_warning, warmup_iterations
from ddp_toolkit.duration import Duration
from ddp_toolkit.lr import (
    Schedule,
    adam_sqrt_hparams,
    auto_warmup_start_factor,
    scaled_beta2,
    scaled_lr,
    scaled_weight_decay,
)
from ddp_toolkit.plan import BatchPlan

__all__ = ["batch_schedule_for", "fingerprint", "lr_info", "make_optimizer", "plan_for", "preflight", "schedule_for",
           "schedule_of_plan",
           "train_from_config", "warmup_start_factor"]


def plan_for(cfg: Config, dataset_size: int, world_size: int) -> BatchPlan:
    """The batch plan of a config at a world size: k given, or derived from batch.global_batch_size.

    With data.order=distributed_sampler the plan's dataset_size is the N' samples an epoch of that order trains on
    (orders.py), so iterations per epoch, batch sizes and samples_seen count what really runs."""
    b = cfg.batch
    k = b.grad_accum_steps if b.grad_accum_steps or b.global_batch_size else 1
    factors = dict(global_batch_size=b.global_batch_size, micro_batch_size=b.micro_batch_size, world_size=world_size,
                   grad_accum_steps=k)
    if cfg.data.order == "distributed_sampler":
        from ddp_toolkit.orders import distributed_sampler_epoch

        dataset_size = distributed_sampler_epoch(dataset_size, drop_last=b.drop_last, **factors)
    if b.sizes() is not None:  # a batch-size schedule: the plan of its first phase
        factors.update(global_batch_size=b.sizes()[0][0], grad_accum_steps=None)
    return BatchPlan.solve(dataset_size, drop_last=b.drop_last, **factors)


def batch_schedule_for(cfg: Config, dataset_size: int, world_size: int) -> BatchSchedule:
    """The run's batch-size schedule: batch.schedule or batch.ramp, else one phase (the plan of `plan_for`)."""
    return schedule_of_plan(cfg, plan_for(cfg, dataset_size, world_size))


def schedule_of_plan(cfg: Config, first: BatchPlan) -> BatchSchedule:
    """The batch-size schedule whose first phase is `first` (`plan_for`'s plan); one line for what cannot run."""
    sizes = cfg.batch.sizes()
    if sizes is None:
        return BatchSchedule.fixed(first)
    if cfg.data.order != "global":
        raise ConfigError(f"a batch-size schedule needs data.order: global (the world-size-invariant order), not "
                          f"{cfg.data.order}")
    if cfg.train.engine == "deepspeed":  # (under the deepspeed launcher `auto` is refused by the Trainer)
        raise ConfigError("a batch-size schedule cannot run on train.engine: deepspeed (DeepSpeed fixes the batch size "
                          "and k when it starts); use ddp, accelerate or fsdp")
    schedule = BatchSchedule.of_sizes(first, sizes)
    schedule.walk(cfg.train.stop)  # a phase that would be empty is one line now, not mid-run
    return schedule


def lr_info(cfg: Config, plan: BatchPlan) -> dict:
    """Base and scaled learning rate, the rule, the reference batch (and where that came from), the warmup's start
    factor, and the optimizer's betas, eps and weight decay at B (ConfigError when a rule cannot apply)."""
    o = cfg.optim
    ref, ref_from = reference_batch(cfg, plan)
    kappa, lr = plan.global_batch_size / ref, scaled_lr(o.lr, plan.global_batch_size, ref, o.lr_scaling)
    start = warmup_start_factor(cfg, plan)
    betas, eps, weight_decay = tuple(o.betas), o.eps, o.weight_decay
    try:
        if o.lr_scaling == "adam_sqrt":
            if o.beta2_scaling:
                raise ValueError("optim.beta2_scaling and lr_scaling=adam_sqrt both rescale beta2: choose one")
            betas, eps = adam_sqrt_hparams(betas, eps, kappa)
        if o.beta2_scaling:
            betas = (betas[0], scaled_beta2(betas[1], kappa))
        if o.weight_decay_scaling:
            weight_decay = scaled_weight_decay(weight_decay, o.lr, lr, kappa)
    except ValueError as err:
        raise ConfigError(f"optim: {err}") from None
    return {"base_lr": o.lr, "base_batch_size": ref, "base_batch_size_from": ref_from, "lr_rule": o.lr_scaling,
            "scaled_lr": lr, "warmup_start_factor": start, "betas": betas, "eps": eps, "weight_decay": weight_decay}


def warmup_start_factor(cfg: Config, plan: BatchPlan, rule: str | None = None) -> float:
    """optim.warmup_start_factor, or when null (auto) the factor whose first step uses the base lr under `rule`
    (default optim.lr_scaling; Goyal et al.): 0 when the rule is none or cannot scale (no optim.base_batch_size)."""
    o, rule = cfg.optim, rule or cfg.optim.lr_scaling
    if o.warmup_start_factor is not None:
        return o.warmup_start_factor
    ref, _ = reference_batch(cfg, plan)
    return auto_warmup_start_factor(rule if o.base_batch_size is not None else "none", plan.global_batch_size / ref)


def schedule_notes(cfg: Config, plan: BatchPlan, total: int) -> list[str]:
    """One line for each setting the run adapted: a rule that cannot scale, a warmup or milestones cut."""
    notes = [scaling_warning(cfg), warmup_iterations(cfg, plan, total)[1], milestone_iterations(cfg, plan, total)[1]]
    return [n for n in notes if n]


def schedule_for(cfg: Config, plan: BatchPlan, total: int, batches: BatchSchedule | None = None) -> Schedule:
    """The lr schedule of the run, durations converted through the batch schedule (default: the plan's one phase);
    ConfigError when impossible. With several phases the lr follows optim.lr_scaling phase by phase: each phase's
    lr is the rule's lr at its B (`phase_factors`, relative to the first phase's), times the warmup/decay shape."""
    o, info = cfg.optim, lr_info(cfg, plan)
    peak, durations = info["scaled_lr"], batches or plan
    warmup, _ = warmup_iterations(cfg, durations, total)  # a warmup longer than the run lasts the run (with a note)
    milestones, _ = milestone_iterations(cfg, durations, total)
    factors = ()
    if batches is not None and not batches.is_fixed:
        factors = tuple((pos.iteration, lr_info(cfg, batches.phases[j].plan)["scaled_lr"] / peak)
                        for j, pos in batches.phase_starts(total))
    try:
        return Schedule(peak_lr=peak, total_iterations=total, warmup_iterations=warmup,
                        warmup_start_factor=info["warmup_start_factor"], decay=o.schedule,
                        step_milestones=milestones, step_gamma=o.step_gamma, min_lr=min(o.min_lr, peak),
                        decay_fraction=o.decay_fraction, phase_factors=factors)
    except ValueError as err:
        raise ConfigError(f"optim: {err}") from None


def make_optimizer(cfg: Config, plan: BatchPlan, params) -> Any:
    """The configured optimizer at the scaled lr, with lr_info's betas, eps and weight decay: adam_sqrt rescales
    betas and eps (Malladi et al.), optim.beta2_scaling β2, optim.weight_decay_scaling the weight decay."""
    from ddp_toolkit.optim import build_optimizer

    o, info = cfg.optim, lr_info(cfg, plan)
    return build_optimizer(params, o.name, info["scaled_lr"], momentum=o.momentum, weight_decay=info["weight_decay"],
                           betas=info["betas"], eps=info["eps"])


def fingerprint(cfg: Config, plan: BatchPlan, schedule: Schedule) -> dict[str, Any]:
    """Everything that changes the trajectory, as flat `key: value` pairs (what a resume must match).

    World size and micro-batch size are left out on purpose: the global order and the exact global-mean
    gradient depend on B, not on how it is split, so a run may resume at another W (elastic resume) — except
    with `data.order: distributed_sampler`, whose order depends on W.
    """
    t = cfg.train
    out: dict[str, Any] = {"global_batch_size": plan.global_batch_size, "dataset_size": plan.dataset_size,
                           "drop_last": plan.drop_last, "train.seed": t.seed, "train.precision": t.precision,
                           "train.sync_batchnorm": t.sync_batchnorm}
    for key in ("loss", "ignore_index", "causal_shift", "loss_factory", "deterministic"):  # what the loss means
        if hasattr(t, key):
            out[f"train.{key}"] = getattr(t, key)
    if getattr(cfg.data, "order", "global") != "global":
        out["world_size"] = plan.world_size
    for section in ("data", "model", "optim"):
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            out[f"{section}.{key}"] = value
    sizes = cfg.batch.sizes()
    if sizes is not None:  # a batch-size schedule: B of every phase and where it ends
        out["batch.schedule"] = " → ".join(f"{size}" + ("" if until is None else f" until {Duration.parse(until)}")
                                           for size, until in sizes)
    if schedule.decay != "constant":  # a decaying schedule depends on the run's length
        out["total_iterations"] = schedule.total_iterations
    return out


def preflight(cfg: Config, world_size: int) -> BatchPlan:
    """Check what can be checked before any worker starts: data, model, step and collate (one sample batch through
    the step, ddp_toolkit.workload), plan, schedule — so a bad factory or loss is exit 2 here, not a worker crash."""
    from ddp_toolkit.workload import build_workload

    train_set = build_workload(cfg).train_set
    plan = plan_for(cfg, len(train_set), world_size)
    batches = schedule_of_plan(cfg, plan)
    schedule_for(cfg, plan, batches.iterations_in(cfg.train.stop), batches)
    return plan


def train_from_config(cfg: Config, env=None, **trainer_kwargs) -> dict:
    """Build the configured workload (data, model seeded by train.seed, step: ddp_toolkit.workload) and train;
    returns the summary. `trainer_kwargs` go to the Trainer (a `step` or `loss_fn` there replaces the config's)."""
    from ddp_toolkit.trainer import Trainer
    from ddp_toolkit.workload import build_workload

    w = build_workload(cfg)
    if not {"step", "loss_fn", "count_items"} & trainer_kwargs.keys():
        trainer_kwargs["step"] = w.step
    return Trainer(w.model, w.train_set, cfg, eval_set=w.eval_set, env=env, **trainer_kwargs).fit()

