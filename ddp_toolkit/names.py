"""Every list of names a user can choose from, declared once (no torch import): the config, the CLI, the
sweeps and the modules that implement them derive their choices from these Literals with `typing.get_args`.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DECAYS", "Decay", "ENGINES", "EngineName", "OPTIMIZERS", "OptimizerName", "SCALING_RULES",
           "ScalingRule"]

ScalingRule = Literal["none", "linear", "sqrt", "adam_sqrt"]
"""Large-batch lr rules: none, lr·B/B_ref, lr·sqrt(B/B_ref), Malladi et al.'s Adam rule."""
Decay = Literal["constant", "cosine", "step", "wsd"]
"""lr schedules after the warmup (wsd: warmup–stable–decay, Hägele et al. 2024)."""
OptimizerName = Literal["sgd", "adam", "adamw", "lars", "lamb"]
"""Optimizers: torch's sgd/adam/adamw, pytorch-optimizer's lars/lamb."""
EngineName = Literal["auto", "ddp", "fsdp", "accelerate", "deepspeed"]
"""Gradient-sync engines; auto picks one from the launcher."""

SCALING_RULES: tuple[str, ...] = get_args(ScalingRule)
DECAYS: tuple[str, ...] = get_args(Decay)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
ENGINES: tuple[str, ...] = get_args(EngineName)
