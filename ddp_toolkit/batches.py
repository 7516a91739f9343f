"""Batches of any structure (tensors, tuples, lists, dicts): moving to a device, the empty micro-batch of a
rank whose cell holds no sample, and the collate functions the loaders use.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["batch_as_is", "empty_like", "to_device"]


def to_device(batch: Any, device: torch.device) -> Any:
    """The same structure with every tensor on `device` (non-blocking where the source is pinned)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def empty_like(batch: Any) -> Any:
    """The same structure with zero rows: the input of a rank whose micro-step got no samples."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(empty_like(b) for b in batch)
    if isinstance(batch, dict):
        return {k: empty_like(v) for k, v in batch.items()}
    return batch


def batch_as_is(batch: Any) -> Any:
    """Collate for datasets whose `__getitems__` already returns a batch (picklable for worker processes)."""
    return batch
