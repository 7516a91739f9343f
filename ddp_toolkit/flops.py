"""FLOPs of one training micro-step, counted once, and the peak FLOP/s that MFU is measured against.

The count runs forward + backward of one real micro-batch through a copy of the model on the `meta` device
(`torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and attention from shapes alone): no
memory, no compute, and the real model's weights, gradients, buffers (BatchNorm statistics) and RNG streams
are untouched. FLOPs per iteration are then scaled by items: FLOPs/item of the measured micro-batch × items of
the iteration. That is exact for per-sample models and fixed-length sequences and an approximation otherwise
(attention grows with the square of the sequence length); the optimizer step, elementwise ops and the
all-reduce are not counted, as in the usual MFU definition (Chowdhery et al., 2022, appendix B).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PEAK_FLOPS", "count_micro_step_flops", "meta_copy", "peak_flops_of"]

PEAK_FLOPS = (  # (name contains, bf16 dense FLOP/s per device, from the vendors' data sheets); first match wins
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)
"""Peak FLOP/s by device name; `report.peak_flops` overrides it, and a device not listed has no MFU."""


def peak_flops_of(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override`, else the table's bf16 dense figure for a known GPU, else None."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers live on the meta device (no memory is copied)."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def _to_meta(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return torch.empty_like(batch, device="meta")
    if isinstance(batch, dict):
        return {k: _to_meta(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        out = [_to_meta(v) for v in batch]
        return type(batch)(*out) if hasattr(batch, "_fields") else type(batch)(out)
    return batch


def count_micro_step_flops(module: nn.Module, step, batch: Any) -> int:
    """FLOPs of forward + backward of `step` on `batch` (the CPU micro-batch), counted on a meta copy."""
    model = meta_copy(module)
    model.train(module.training)
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:  # dropout draws no real numbers
        _, losses = step.forward(model, _to_meta(batch))
        losses.sum().backward()
    return int(counter.get_total_flops())
