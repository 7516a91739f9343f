"""ddp_toolkit: distributed data-parallel training on PyTorch with exact batch accounting.

Public names are imported lazily, so `ddp-toolkit plan` and `import ddp_toolkit.plan` do not load torch.
"""

import importlib

_EXPORTS = {
    "BatchPlan": "plan", "PlanError": "plan",
    "Config": "config", "ConfigError": "config", "load_config": "config",
    "DistEnv": "dist",
    "Schedule": "lr", "build_scheduler": "lr", "scaled_lr": "lr",
    "NoiseScaleEstimator": "noise_scale",
    "build_optimizer": "optim",
    "Permutation": "permutation",
    "Progress": "progress",
    "EvalSampler": "sampler", "GlobalBatchSampler": "sampler", "reduce_metric_sums": "sampler",
    "Trainer": "trainer", "train_from_config": "trainer",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ddp_toolkit.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ddp_toolkit' has no attribute {name!r}")
