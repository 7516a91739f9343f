"""Gradient-sync engines: torch DDP (default), FSDP2, Accelerate, DeepSpeed — one small interface.

Each list of names is declared once: `EngineName` lives in names.py, which the config uses too.
"""

from __future__ import annotations

from ddp_toolkit.dist import DistEnv
from ddp_toolkit.engines.base import CommStats, Engine
from ddp_toolkit.names import ENGINES, EngineName
from ddp_toolkit.plan import BatchPlan

__all__ = ["CommStats", "ENGINE_NAMES", "Engine", "EngineName", "build_engine", "resolve_engine"]

ENGINE_NAMES = ENGINES  # declared once, in names.py (torch-free, so config.py can use it)


def resolve_engine(requested: str, env: DistEnv, deepspeed_config: str | None = None) -> str:
    """`auto` → accelerate under `accelerate launch`, deepspeed under its launcher with a config, else ddp."""
    if requested != "auto":
        return requested
    if env.launcher == "accelerate":
        return "accelerate"
    if env.launcher == "deepspeed" and deepspeed_config:
        return "deepspeed"
    return "ddp"


def engine_class(name: str) -> type[Engine]:
    """The class of a resolved engine name (imported on demand: the optional extras stay optional)."""
    if name == "ddp":
        from ddp_toolkit.engines.ddp import DDPEngine

        return DDPEngine
    if name == "fsdp":
        from ddp_toolkit.engines.fsdp import FSDPEngine

        return FSDPEngine
    if name == "accelerate":
        from ddp_toolkit.engines.accelerate import AccelerateEngine

        return AccelerateEngine
    from ddp_toolkit.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine


def build_engine(cfg, env: DistEnv, plan: BatchPlan) -> Engine:
    """The engine named by `train.engine` (resolved for `auto`)."""
    return engine_class(resolve_engine(cfg.train.engine, env, cfg.train.deepspeed_config))(env, plan, cfg)
