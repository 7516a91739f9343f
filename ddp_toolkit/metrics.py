"""What one iteration measured, the one scalar all-reduce of an iteration, and the metrics logger.

`ScalarReduce`: components that need a global sum read on the host (the logged loss, the stop vote) add a
named float; the trainer runs at most one such all-reduce per iteration for all of them (the noise scale's
norms are summed on the device and read only on logged iterations).
`MetricsLogger` owns the logging cadence, the throughput window and the metrics row; the learning rate and
momentum/betas in a row are read from the optimizer, so the metrics are evidence of what was used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ddp_toolkit.dist import all_reduce_sum
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.progress import Progress

__all__ = ["IterationResult", "MetricsLogger", "ScalarReduce", "optimizer_hparams"]


@dataclass
class IterationResult:
    """One finished iteration as the loop saw it (local values; the reduce makes them global)."""

    samples: int
    """Global samples of this iteration (B, or fewer in a short last batch)."""
    items: int
    """Global loss items (samples, or tokens for a token loss) the loss was divided by."""
    item_losses: list[torch.Tensor]
    """This rank's per-item losses (detached), summed only when the iteration is logged."""
    grad_norm: float
    """Global gradient norm after the sync, before clipping (the iteration's one host synchronisation)."""
    hparams: dict[str, float]
    """lr (and momentum/betas) the optimizer used for this iteration's step."""
    comm: tuple[int, int, int]
    """All-reduce calls, rounds and bytes of the gradient sync."""
    skipped: bool = False
    """The update was skipped for a non-finite gradient norm (train.on_nonfinite=skip)."""
    seconds: float = 0.0
    first_items: int = 0
    """This rank's items in its first micro-batch (the noise scale's small batch when W = 1)."""


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """lr, and momentum / beta1 / beta2 / eps where the optimizer has them, of its first param group."""
    group = optimizer.param_groups[0]
    out = {"lr": float(group["lr"])}
    if "momentum" in group:
        out["momentum"] = float(group["momentum"])
    if "betas" in group:
        out["beta1"], out["beta2"] = (float(b) for b in group["betas"])
    if "eps" in group and "betas" in group:
        out["eps"] = float(group["eps"])
    return out


@dataclass
class ScalarReduce:
    """Named floats summed over ranks in one all-reduce (float64)."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values[name] = float(value)

    def run(self, device: torch.device) -> dict[str, float]:
        if not self.values:
            return {}
        names = list(self.values)
        return dict(zip(names, all_reduce_sum([self.values[n] for n in names], device), strict=True))


class MetricsLogger:
    """Decides which iterations are logged and builds their rows; rank 0's reporter writes them."""

    def __init__(self, reporter, plan: BatchPlan, progress: Progress, every: int) -> None:
        self.reporter, self.plan, self.progress, self.every = reporter, plan, progress, every
        self._window_start, self._window_samples = time.perf_counter(), progress.samples_seen

    def restart_window(self) -> None:
        self._window_start, self._window_samples = time.perf_counter(), self.progress.samples_seen

    def should_log(self, iteration: int, last: bool) -> bool:
        return last or iteration % self.every == 0

    @staticmethod
    def local_loss_sum(result: IterationResult) -> float:
        return float(torch.cat([x.reshape(-1) for x in result.item_losses]).double().sum())

    def log(self, result: IterationResult, loss_sum: float, extra: dict | None = None) -> dict:
        """Write the row of the iteration just finished; `loss_sum` is the global sum of item losses."""
        now = time.perf_counter()
        seconds, self._window_start = now - self._window_start, now
        samples, self._window_samples = self.progress.samples_seen - self._window_samples, self.progress.samples_seen
        p, plan = self.progress, self.plan
        calls, rounds, nbytes = result.comm
        row = {
            "iteration": p.iteration, "epoch": plan.epochs_for(p.iteration), "samples_seen": p.samples_seen,
            "items_seen": p.items_seen, "global_batch_size": plan.global_batch_size,
            "batch_samples": result.samples, "batch_items": result.items, "local_batch_size": plan.local_batch_size,
            "micro_batch_size": plan.micro_batch_size, "world_size": plan.world_size,
            "grad_accum_steps": plan.grad_accum_steps, **result.hparams,
            "loss": loss_sum / result.items, "grad_norm": result.grad_norm,
            "skipped_iterations": p.skipped_iterations,
            "allreduces_per_iteration": calls, "allreduce_rounds_per_iteration": rounds,
            "allreduce_bytes_per_iteration": nbytes,
            "samples_per_second": samples / seconds if seconds > 0 else None,
            **(extra or {}),
        }
        self.reporter.log(row)
        return row
