"""Hugging Face Accelerate engine: `accelerator.prepare(model, optimizer)` only, our sampler keeps the data.

What `accelerate launch` set (processes, mixed precision) is honoured; `train.precision: bf16` may also ask
for bf16. The scheduler is not prepared (the trainer steps it once per iteration) and no dataloader is
prepared (no second sharding). Gradient sync: `accelerator.no_sync(model)` on the first k−1 micro-steps; the
same counting comm hook as the ddp engine measures the all-reduce traffic on the DDP model Accelerate returns.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddp_toolkit.config import ConfigError
from ddp_toolkit.engines.base import Engine
from ddp_toolkit.engines.ddp import HookNormsMixin, HookState, counting_allreduce_hook

__all__ = ["AccelerateEngine", "mixed_precision_for"]


def mixed_precision_for(launched: str | None, precision: str) -> str:
    """Accelerate's mixed_precision from the launcher's choice and `train.precision` (bf16 if either asks).

    fp16 and fp8 are refused: their loss scaler skips steps on overflow, and a skipped step would still be
    counted as an iteration, so the batch accounting would no longer describe the run.
    """
    launched = (launched or "no").lower()
    if launched not in ("no", "bf16"):
        raise ConfigError(f"accelerate launch --mixed_precision {launched} is not supported by the accelerate "
                          f"engine (a loss scaler may skip steps); use --mixed_precision bf16 or no")
    return "bf16" if "bf16" in (launched, precision) else "no"


class AccelerateEngine(HookNormsMixin, Engine):
    """`Accelerator` wrapping our model and optimizer; everything else (data, schedule, loss weighting) is ours."""

    name = "accelerate"

    def __init__(self, env, plan, cfg) -> None:
        super().__init__(env, plan, cfg)
        for flag, what in (("ACCELERATE_USE_DEEPSPEED", "--use_deepspeed"), ("ACCELERATE_USE_FSDP", "--use_fsdp")):
            if os.environ.get(flag, "false").lower() == "true":
                raise ConfigError(f"accelerate launch {what} is not supported by the accelerate engine; use plain "
                                  f"`accelerate launch --multi_gpu` (or train.engine=deepspeed for DeepSpeed)")
        self.mixed_precision = mixed_precision_for(os.environ.get("ACCELERATE_MIXED_PRECISION"),
                                                   cfg.train.precision)
        self.hook_state = HookState(self.comm)
        self.accelerator = None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from accelerate import Accelerator

        # without CUDA, Accelerate only goes multi-process when told cpu=True (ACCELERATE_USE_CPU does the same)
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=self.env.device.type == "cpu",
                                       gradient_accumulation_steps=1)  # we accumulate: backward must not divide
        state = self.accelerator.state
        if state.num_processes != self.env.world_size or state.process_index != self.env.rank:
            raise ConfigError(f"Accelerate sees process {state.process_index} of {state.num_processes}, the "
                              f"launcher's environment says rank {self.env.rank} of {self.env.world_size}")
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if isinstance(model, DistributedDataParallel):
            model.register_comm_hook(self.hook_state, counting_allreduce_hook)
        self.model, self.optimizer = model, optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        """Accelerate's prepared model runs its forward under its own autocast (mixed_precision)."""
        return contextlib.nullcontext()

    @property
    def supports_norm_measurement(self) -> bool:
        return isinstance(self.model, DistributedDataParallel)

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        if sync:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.accelerator.backward(loss)

    def close(self) -> None:
        self.accelerator = None
