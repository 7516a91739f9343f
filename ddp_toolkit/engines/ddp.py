"""torch DistributedDataParallel engine: no_sync on the first k−1 micro-steps, a counting comm hook."""

# no `from __future__ import annotations`: DDP checks the hook signature at run time

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ddp_toolkit.engines.base import CommStats, Engine


class HookState:
    """State of the counting hook: traffic counters and, for the noise scale, squared gradient norms.

    The norms stay on the device as tensors (no host synchronisation inside the hook, which runs inline for
    NCCL futures); `norms()` reads them once, after the iteration's own synchronisation.
    """

    def __init__(self, comm: CommStats, process_group=None) -> None:
        self.comm = comm
        self.process_group = process_group
        self.measure_norms = False
        self.local_sq: torch.Tensor | float = 0.0
        self.global_sq: torch.Tensor | float = 0.0

    def reset_norms(self) -> None:
        self.local_sq, self.global_sq = 0.0, 0.0

    def norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The squared norms as float64 tensors on the gradients' device (not read: no host synchronisation)."""
        return torch.as_tensor(self.local_sq, dtype=torch.float64), torch.as_tensor(self.global_sq, dtype=torch.float64)


def counting_allreduce_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's own all-reduce (average over ranks), counting calls, rounds and bytes on the way.

    With `measure_norms` it also records |local gradient|² before and |global gradient|² after the
    all-reduce: the two measurements the gradient noise scale needs, at no extra communication.
    """
    buffer = bucket.buffer()
    state.comm.calls += 1
    state.comm.bytes += buffer.numel() * buffer.element_size()
    if bucket.index() == 0:
        state.comm.rounds += 1
    if not state.measure_norms:
        return default_hooks.allreduce_hook(state.process_group, bucket)
    state.local_sq = state.local_sq + torch.linalg.vector_norm(buffer, dtype=torch.float64) ** 2

    def record(fut: torch.futures.Future) -> torch.Tensor:
        tensor = fut.value()
        state.global_sq = state.global_sq + torch.linalg.vector_norm(tensor, dtype=torch.float64) ** 2
        return tensor

    return default_hooks.allreduce_hook(state.process_group, bucket).then(record)


class HookNormsMixin:
    """Noise-scale norms from the counting hook, for engines whose model is a torch DDP (`self.hook_state`)."""

    hook_state: HookState

    def measure_norms(self, enabled: bool) -> None:
        self.hook_state.measure_norms = enabled
        self.hook_state.reset_norms()

    def measured_norms(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.hook_state.norms() if self.hook_state.measure_norms else None


class DDPEngine(HookNormsMixin, Engine):
    """The default engine: torch DDP when W > 1, the bare model when W = 1."""

    name = "ddp"
    find_unused_parameters = False

    def __init__(self, env, plan, cfg=None) -> None:
        super().__init__(env, plan, cfg)
        self.hook_state = HookState(self.comm)

    @property
    def supports_norm_measurement(self) -> bool:
        return self.env.is_distributed

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model = model.to(self.env.device)
        if self.env.is_distributed:
            device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids,
                                            find_unused_parameters=self.find_unused_parameters)
            model.register_comm_hook(self.hook_state, counting_allreduce_hook)
        self.model, self.optimizer = model, optimizer

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        if self.env.is_distributed and not sync:
            return self.model.no_sync()
        return contextlib.nullcontext()
