"""ddp_toolkit: distributed data-parallel training on PyTorch with exact batch accounting."""

from ddp_toolkit.plan import BatchPlan, PlanError

__all__ = ["BatchPlan", "PlanError"]
__version__ = "0.1.0"
