"""What one iteration measured, the one scalar all-reduce of an iteration, and the metrics logger.

`ScalarReduce`: components that need a global sum read on the host (the logged loss, the stop vote) add a
named float; the trainer runs at most one such all-reduce per iteration for all of them (the noise scale's
norms are summed on the device and read only on logged iterations).
`MetricsLogger` owns the logging cadence, the throughput window and the metrics row; the learning rate and
momentum/betas in a row are read from the optimizer, so the metrics are evidence of what was used.
Throughput: samples (and tokens) per second over the window since the last logged row; FLOP/s from the FLOPs
of one micro-step counted once (flops.py) scaled by the items of the window; mfu against the peak of W devices.
Time breakdown (host clocks of rank 0, no device sync): data wait, forward+backward, optimizer step of the
logged iteration. On CUDA kernels run asynchronously, so queued compute is waited for in the optimizer step
(the gradient-norm read); the gradient all-reduce overlaps the backward and is inside forward+backward (not
measurable apart without a sync). Peak memory: CUDA max allocated, or the peak RSS of rank 0's process on CPU.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from ddp_toolkit.batch_schedule import epochs_at
from ddp_toolkit.dist import all_reduce_sum
from ddp_toolkit.flops import count_micro_step_flops, peak_flops_of
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
    comm: tuple[int, int, int, int, int]
    """All-reduce calls, rounds and bytes of the gradient sync."""
    skipped: bool = False
    """The update was skipped for a non-finite gradient norm (train.on_nonfinite=skip)."""
    seconds: float = 0.0
    first_items: int = 0
    """This rank's items in its first micro-batch (the noise scale's small batch when W = 1)."""
    data_seconds: float = 0.0
    """Host time waiting for this iteration's micro-batches (rank-local)."""
    compute_seconds: float = 0.0
    """Host time of the k forward+backward passes, the synced all-reduce included (rank-local)."""
    step_seconds: float = 0.0
    """Host time of the gradient norm, clipping, optimizer step, schedule and zero_grad (rank-local)."""


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


def _data_wait_fraction(result: IterationResult) -> float | None:
    """Share of the logged iteration spent waiting for its micro-batches (host clock of this rank)."""
    waited, seconds = getattr(result, "data_seconds", None), result.seconds
    return waited / seconds if waited is not None and seconds > 0 else None


class MetricsLogger:
    """Decides which iterations are logged and builds their rows; rank 0's reporter writes them."""

    def __init__(self, reporter, plan: BatchPlan, progress: Progress, every: int) -> None:
        self.reporter, self.plan, self.progress, self.every = reporter, plan, progress, every
        report_cfg = getattr(getattr(reporter, "cfg", None), "report", None)
        self.wants_flops = bool(getattr(reporter, "enabled", False) and getattr(report_cfg, "flops", False))
        """True until the FLOPs of one micro-step are counted (rank 0 only: it alone writes rows)."""
        self._peak_override = getattr(report_cfg, "peak_flops", None)
        self.device = getattr(getattr(reporter, "env", None), "device", torch.device("cpu"))
        self.flops_per_item: float | None = None
        self.peak_flops: float | None = None
        self.restart_window()

    def restart_window(self) -> None:
        self._window_start, self._window_samples = time.perf_counter(), self.progress.samples_seen
        self._window_items = self.progress.items_seen

    def should_log(self, iteration: int, last: bool) -> bool:
        return last or iteration % self.every == 0

    def count_flops(self, module: torch.nn.Module, step, micro_batches: list, counts: list[int]) -> None:
        """FLOPs of the largest micro-batch (once, before its forward); a failure is one warning, no FLOP/s."""
        m = max(range(len(counts)), key=counts.__getitem__)
        if counts[m] == 0:
            return  # an empty cell: try again next iteration
        self.wants_flops = False
        try:
            self.flops_per_item = count_micro_step_flops(module, step, micro_batches[m]) / counts[m]
        except Exception as err:  # a step or model that cannot run on meta tensors (data-dependent shapes)
            self.reporter.warn(f"FLOPs not counted ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                               f"no flops_per_second or mfu (report.flops=false silences this)")
            return
        self.peak_flops = peak_flops_of(self.device, self._peak_override)

    def _peak_memory_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**20 if sys.platform == "darwin" else 2**10)

    def _throughput(self, result: IterationResult, tokens: bool) -> dict:
        """Rates over the window since the last logged row (samples, tokens, FLOPs) and mfu."""
        now, p = time.perf_counter(), self.progress
        seconds, self._window_start = now - self._window_start, now
        samples, self._window_samples = p.samples_seen - self._window_samples, p.samples_seen
        items, self._window_items = p.items_seen - self._window_items, p.items_seen

        def rate(n: float) -> float | None:
            return n / seconds if seconds > 0 else None

        out = {"samples_per_second": rate(samples)}
        if tokens:
            out["tokens_per_second"] = rate(items)
        if self.flops_per_item is not None:
            flops_per_second = rate(self.flops_per_item * items)
            out.update(flops_per_iteration=self.flops_per_item * result.items, flops_per_second=flops_per_second)
            if self.peak_flops is not None and flops_per_second is not None:
                out["mfu"] = flops_per_second / (self.peak_flops * self.plan.world_size)
        return out

    @staticmethod
    def local_loss_sum(result: IterationResult) -> float:
        return float(torch.cat([x.reshape(-1) for x in result.item_losses]).double().sum())

    def log(self, result: IterationResult, loss_sum: float, extra: dict | None = None) -> dict:
        """Write the row of the iteration just finished; `loss_sum` is the global sum of item losses."""
        p, plan = self.progress, self.plan
        calls, rounds, nbytes, gathers, gather_bytes = result.comm
        if gathers:  # a sharded engine: its parameter all-gathers per iteration, next to the reduce-scatters
            extra = {"allgathers_per_iteration": gathers, "allgather_bytes_per_iteration": gather_bytes,
                     **(extra or {})}
        row = {
            "iteration": p.iteration, "epoch": epochs_at(p.position(), plan.dataset_size),
            "samples_seen": p.samples_seen, "items_seen": p.items_seen, "global_batch_size": plan.global_batch_size,
            "batch_samples": result.samples, "batch_items": result.items, "local_batch_size": plan.local_batch_size,
            "micro_batch_size": plan.micro_batch_size, "world_size": plan.world_size,
            "grad_accum_steps": plan.grad_accum_steps, **result.hparams,
            "loss": loss_sum / result.items, "grad_norm": result.grad_norm,
            "skipped_iterations": p.skipped_iterations,
            "allreduces_per_iteration": calls, "allreduce_rounds_per_iteration": rounds,
            "allreduce_bytes_per_iteration": nbytes,
            **self._throughput(result, tokens="tokens_seen" in (extra or {})),
            "iteration_seconds": result.seconds, "data_seconds": result.data_seconds,
            "compute_seconds": result.compute_seconds, "optimizer_seconds": result.step_seconds,
            "peak_memory_mib": self._peak_memory_mib(),
            "data_wait_fraction": _data_wait_fraction(result),
            **(extra or {}),
        }
        self.reporter.log(row)
        return row
