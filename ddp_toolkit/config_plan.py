"""What a config's durations mean in iterations for a batch plan: warmup, milestones, cadences, and the lr
reference. Shared by the trainer and `ddp-toolkit plan`, so both say the same numbers; no torch import.

Each helper that adapts a setting to the run returns `(value, note)`: the note (or None) is one line for the
console saying what was adapted.
"""

from __future__ import annotations

from ddp_toolkit.config import Config, ConfigError
from ddp_toolkit.duration import Duration
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.text import count

__all__ = ["DIGITS_TRAIN_SIZE", "cadence_iterations", "dataset_size", "milestone_iterations",
           "reference_batch", "scaling_warning", "warmup_iterations"]

DIGITS_TRAIN_SIZE = 1437
"""Training samples of the built-in digits set (ddp_toolkit.data.digits)."""


def dataset_size(cfg: Config) -> int:
    """N of the config's training set, without building it where it is known (synthetic, digits)."""
    if cfg.data.name == "synthetic":
        return cfg.data.size
    if cfg.data.name == "digits":
        return DIGITS_TRAIN_SIZE
    from ddp_toolkit.data import build_data  # a custom factory: build it to count

    try:
        train_set, _ = build_data(cfg.data)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return len(train_set)


def scaling_warning(cfg: Config, rule: str | None = None) -> str | None:
    """A rule that cannot scale: optim.lr_scaling (or `rule`) is not none but there is no reference batch."""
    o, rule = cfg.optim, rule or cfg.optim.lr_scaling
    if rule == "none" or o.base_batch_size is not None:
        return None
    return (f"optim.lr_scaling is {rule} but optim.base_batch_size is not set, so the global batch is its "
            f"own reference and the lr is not scaled; set optim.base_batch_size to the batch optim.lr was tuned at")


def reference_batch(cfg: Config, plan: BatchPlan) -> tuple[int, str]:
    """B_ref of optim.lr and where it came from (`optim.base_batch_size`, or the global batch when none is set)."""
    if cfg.optim.base_batch_size is not None:
        return cfg.optim.base_batch_size, "optim.base_batch_size"
    return plan.global_batch_size, "the global batch: no optim.base_batch_size"


def warmup_iterations(cfg: Config, plan: BatchPlan, total: int) -> tuple[int, str | None]:
    """optim.warmup in iterations; a warmup longer than the run is cut to the run's length, with a note."""
    warmup = plan.iterations_in(cfg.optim.warmup or 0)
    if warmup <= total:
        return warmup, None
    return total, (f"optim.warmup {Duration.parse(cfg.optim.warmup)} is {count(warmup, 'iteration')}, longer than "
                   f"the run of {count(total, 'iteration')}: the warmup lasts the whole run")


def milestone_iterations(cfg: Config, plan: BatchPlan, total: int) -> tuple[tuple[int, ...], str | None]:
    """optim.step_milestones in iterations; those past the end of the run (or inside a warmup cut to the run)
    are dropped, with a note. Milestones inside an uncut warmup stay, for the schedule to refuse."""
    warmup, cut = warmup_iterations(cfg, plan, total)
    kept, dropped = [], []
    for text in cfg.optim.step_milestones:
        iteration = plan.iterations_in(text)
        past_end = iteration > total or (cut is not None and iteration <= warmup)
        (dropped if past_end else kept).append((text, iteration))
    if not dropped:
        return tuple(i for _, i in kept), None
    names = ", ".join(f"{Duration.parse(t)} (iteration {i})" for t, i in dropped)
    return tuple(i for _, i in kept), (f"optim.step_milestones {names} "
                                       f"{'is' if len(dropped) == 1 else 'are'} not inside the run of "
                                       f"{count(total, 'iteration')} after the warmup: dropped")


def cadence_iterations(every: Duration | str | int | None, plan: BatchPlan) -> int:
    """An `every` duration (eval_every, checkpoint_every) in iterations (epochs and samples round up); 0 for
    none."""
    return 0 if every is None else plan.iterations_in(every)
