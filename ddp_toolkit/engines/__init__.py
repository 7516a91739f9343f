"""Gradient-sync engines: torch DDP (default), Accelerate, DeepSpeed — one small interface."""

from __future__ import annotations

from ddp_toolkit.dist import DistEnv
from ddp_toolkit.engines.base import CommStats, Engine
from ddp_toolkit.plan import BatchPlan

__all__ = ["CommStats", "Engine", "build_engine", "resolve_engine"]


def resolve_engine(requested: str, env: DistEnv, deepspeed_config: str | None = None) -> str:
    """`auto` → accelerate under `accelerate launch`, deepspeed under its launcher with a config, else ddp."""
    if requested != "auto":
        return requested
    if env.launcher == "accelerate":
        return "accelerate"
    if env.launcher == "deepspeed" and deepspeed_config:
        return "deepspeed"
    return "ddp"


def build_engine(cfg, env: DistEnv, plan: BatchPlan, *, sync_every_micro_step: bool = False) -> Engine:
    """The engine named by `train.engine` (resolved for `auto`)."""
    name = resolve_engine(cfg.train.engine, env, cfg.train.deepspeed_config)
    if name == "ddp":
        from ddp_toolkit.engines.ddp import DDPEngine

        return DDPEngine(env, plan, sync_every_micro_step=sync_every_micro_step)
    if name == "accelerate":
        from ddp_toolkit.engines.accelerate import AccelerateEngine

        return AccelerateEngine(env, plan, cfg, sync_every_micro_step=sync_every_micro_step)
    from ddp_toolkit.engines.deepspeed import DeepSpeedEngine

    if sync_every_micro_step:
        raise ValueError("sync_every_micro_step applies to the ddp and accelerate engines; DeepSpeed's ZeRO stage "
                         "decides when it reduces")
    return DeepSpeedEngine(env, plan, cfg)
