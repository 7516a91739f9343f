"""The training-step contract: what one micro-step computes, for any batch shape.

The loop asks a step object two things: how many loss items a micro-batch holds (`count`, on the CPU batch,
before the forward pass, so the loss can be divided by the item count of the whole global batch), and the
per-item losses of a forward pass (`forward`). Items are samples for a per-sample loss and tokens for a
per-token one; padding marked with `ignore_index` is not an item. The loop sums losses itself, so a loss that
comes back already reduced (a scalar mean) is refused instead of being mis-weighted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ddp_toolkit.errors import InputError

__all__ = ["LossShapeError", "Step", "TupleStep", "default_loss"]


class LossShapeError(InputError):
    """A loss that does not return one value per item."""


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-item cross-entropy (reduction='none'): the trainer does the weighting itself."""
    return F.cross_entropy(outputs, targets, reduction="none")


class Step(Protocol):
    item_name: str
    """`samples` or `tokens`: what the loss items are (names the items_seen column's meaning)."""
    counts_samples: bool
    """True when every sample is exactly one item, so the global count is the plan's (no communication).
    Must be the same on every rank (it may be decided from the first `count` call)."""

    def count(self, batch: Any) -> int:
        """Loss items in a micro-batch (0 for an empty one), computed without a forward pass."""

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        """(model outputs, per-item losses of the micro-batch; ignored items contribute 0)."""


class TupleStep:
    """`(inputs, targets)` batches; `loss_fn(outputs, targets)` returns one loss per item, of any shape.

    The items are the elements of `targets` (per-sample: (b,), per-token: (b, T)) minus those equal to
    `ignore_index`; `count_items` overrides the count (e.g. a mask kept elsewhere in the batch).
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor] = default_loss, *,
                 ignore_index: int | None = None, count_items: Callable[[Any], int] | None = None) -> None:
        self.loss_fn, self.ignore_index, self.count_items = loss_fn, ignore_index, count_items
        self.item_name = "samples"

    @property
    def counts_samples(self) -> bool:
        return self.count_items is None and self.ignore_index is None and self.item_name == "samples"

    def count(self, batch: Any) -> int:
        if self.count_items is not None:
            return int(self.count_items(batch))
        targets = batch[1]
        if targets.ndim > 1:
            self.item_name = "tokens"
        if self.ignore_index is None:
            return targets.numel()
        return int((targets != self.ignore_index).sum())

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        inputs, targets = batch
        outputs = model(inputs)
        losses = self.loss_fn(outputs, targets)
        if losses.ndim == 0 and targets.numel() != 1:
            raise LossShapeError(f"the loss returned a scalar for {targets.numel()} targets: return one value per "
                                 f"item (e.g. reduction='none'); the trainer divides by the global item count")
        return outputs, losses
