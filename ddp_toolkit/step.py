"""The training-step contract: what one micro-step computes, for any batch shape.

The loop asks a step object two things: how many loss items a micro-batch holds (`count`, on the CPU batch,
before the forward pass, so the loss can be divided by the item count of the whole global batch), and the
per-item losses of a forward pass (`forward`). Items are samples for a per-sample loss and tokens for a
per-token one; padding marked with `ignore_index` is not an item. The loop sums losses itself, so a loss that
comes back already reduced (a scalar mean) is refused instead of being mis-weighted.

Three shapes ship: `TupleStep` for `(inputs, targets)` batches, `DictStep` for dict batches passed as
`model(**batch)` (Hugging Face style, `labels` with -100 for ignored positions), and `FunctionStep` for a
function `(model, batch) -> (sum of item losses, item count)` with a `count(batch)` known before the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ddp_toolkit.errors import InputError

__all__ = ["DictStep", "FunctionStep", "LossShapeError", "Step", "TupleStep", "cross_entropy", "default_loss",
           "logits_of", "mse", "token_cross_entropy"]

IGNORE_INDEX = -100
"""The label of an ignored position (padding, prompt): PyTorch's and Hugging Face's convention."""


class LossShapeError(InputError):
    """A loss that does not return one value per item, or targets that do not fit the model's outputs."""


def _shape(t: Any) -> str:
    return f"({', '.join(str(s) for s in t.shape)})" if isinstance(t, torch.Tensor) else type(t).__name__


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy: (b, C) class scores against (b,) labels; one loss per sample."""
    if outputs.ndim != 2 or targets.ndim != 1 or len(outputs) != len(targets):
        hint = (" (per-token logits: set train.loss=token_cross_entropy)" if outputs.ndim == 3 else "")
        raise LossShapeError(f"cross_entropy scores (b, C) class scores against (b,) labels, got outputs "
                             f"{_shape(outputs)} and targets {_shape(targets)}{hint}")
    return F.cross_entropy(outputs, targets, reduction="none")


default_loss = cross_entropy
"""The per-item loss of `(inputs, targets)` batches when none is given (the trainer does the weighting)."""


def token_cross_entropy(ignore_index: int = IGNORE_INDEX) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-token cross-entropy: (..., V) logits against (...) labels; ignored positions give 0 (not items)."""

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.ndim < 2 or outputs.shape[:-1] != targets.shape:
            raise LossShapeError(f"token_cross_entropy scores (b, T, V) logits against (b, T) labels, got outputs "
                                 f"{_shape(outputs)} and targets {_shape(targets)}")
        flat = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="none",
                               ignore_index=ignore_index)
        return flat.view(targets.shape)

    return loss


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error, averaged over each sample's values: one loss per sample."""
    if outputs.shape != targets.shape and outputs.shape != (*targets.shape, 1):
        raise LossShapeError(f"mse compares outputs and targets of one shape, got outputs {_shape(outputs)} and "
                             f"targets {_shape(targets)}")
    diff = (outputs.reshape(targets.shape) - targets.to(outputs.dtype)) ** 2
    return diff.reshape(len(diff), -1).mean(dim=1) if diff.ndim > 1 else diff


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs: a tensor, an object with `.logits` (Hugging Face), or a tuple's first."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise LossShapeError(f"the model returned a {type(outputs).__name__}: return logits, or an object with "
                             f"a .logits tensor")
    return logits


def _check_item_losses(losses: Any, targets: torch.Tensor) -> torch.Tensor:
    """One loss per item: a scalar (an already reduced mean) or a wrong batch dimension is refused."""
    if not isinstance(losses, torch.Tensor):
        raise LossShapeError(f"the loss returned a {type(losses).__name__}, not a tensor of per-item losses")
    if losses.ndim == 0 and targets.numel() != 1:
        raise LossShapeError(f"the loss returned a scalar for {targets.numel()} targets: return one value per "
                             f"item (e.g. reduction='none'); the trainer divides by the global item count")
    if losses.ndim > 0 and targets.ndim > 0 and losses.shape[0] != targets.shape[0]:
        raise LossShapeError(f"the loss returned {_shape(losses)} for targets {_shape(targets)}: return one value "
                             f"per item, the batch dimension first")
    return losses


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
    `ignore_index`; `per_sample=True` counts samples whatever the targets' shape (mse on (b, d) targets);
    `count_items` overrides the count (e.g. a mask kept elsewhere in the batch).
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor] = default_loss, *,
                 ignore_index: int | None = None, count_items: Callable[[Any], int] | None = None,
                 per_sample: bool = False) -> None:
        self.loss_fn, self.ignore_index, self.count_items = loss_fn, ignore_index, count_items
        self.per_sample = per_sample
        self.item_name = "samples"

    @property
    def counts_samples(self) -> bool:
        if self.per_sample:
            return self.count_items is None
        return self.count_items is None and self.ignore_index is None and self.item_name == "samples"

    def count(self, batch: Any) -> int:
        targets = _targets(batch)
        if targets.ndim > 1 and not self.per_sample:
            self.item_name = "tokens"  # also with count_items: a per-token loss logs tokens_seen
        if self.count_items is not None:
            return int(self.count_items(batch))
        if self.per_sample:
            return len(targets)
        if self.ignore_index is None:
            return targets.numel()
        return int((targets != self.ignore_index).sum())

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        inputs, targets = batch
        outputs = model(inputs)
        return outputs, _check_item_losses(self.loss_fn(outputs, targets), targets)


def _targets(batch: Any) -> torch.Tensor:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], torch.Tensor):
        raise LossShapeError(f"a (inputs, targets) batch was expected, got a {type(batch).__name__}: return "
                             f"(inputs, targets) from data.collate, or use dict batches with a labels key")
    return batch[1]


class DictStep:
    """Dict batches passed as `model(**batch)` without `labels`; the logits (a tensor or `.logits`) are scored
    against `labels` by per-item cross-entropy, positions equal to `ignore_index` (-100) excluded.

    `causal_shift`: position t predicts label t+1 (logits[:, :-1] against labels[:, 1:]), as Hugging Face causal
    LMs do when labels = input_ids. Items are tokens for (b, T) labels, samples for (b,) labels.
    """

    counts_samples = False  # ignored labels may drop samples: the count is always all-reduced

    def __init__(self, *, causal_shift: bool = False, ignore_index: int = IGNORE_INDEX, labels_key: str = "labels",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.causal_shift, self.ignore_index, self.labels_key = causal_shift, ignore_index, labels_key
        self.loss_fn = loss_fn or token_cross_entropy(ignore_index)
        self.item_name = "tokens"

    def _labels(self, batch: Any) -> torch.Tensor:
        if not isinstance(batch, dict) or not isinstance(batch.get(self.labels_key), torch.Tensor):
            raise LossShapeError(f"a dict batch with a {self.labels_key!r} tensor was expected, got "
                                 f"{type(batch).__name__}{sorted(batch) if isinstance(batch, dict) else ''}")
        labels = batch[self.labels_key]
        if self.causal_shift:
            if labels.ndim != 2:
                raise LossShapeError(f"causal_shift needs (b, T) labels, got {_shape(labels)}")
            labels = labels[:, 1:]
        self.item_name = "tokens" if labels.ndim > 1 else "samples"
        return labels

    def count(self, batch: Any) -> int:
        return int((self._labels(batch) != self.ignore_index).sum())

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        labels = self._labels(batch)
        outputs = model(**{k: v for k, v in batch.items() if k != self.labels_key})
        logits = logits_of(outputs)
        if self.causal_shift:
            logits = logits[:, :-1]
        return outputs, _check_item_losses(self.loss_fn(logits, labels), labels)


class FunctionStep:
    """A user step `fn(model, batch) -> (sum of item losses, item count)`.

    The trainer divides every micro-step's loss by the item count of the whole global batch before the
    backward pass, so the count must be known before the forward: `count(batch)` gives it (default: the
    batch's samples, `counts_samples`). The count `fn` returns is checked against it on the first call, so a
    mismatch is one clear error instead of a silently mis-weighted gradient.
    """

    def __init__(self, fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]], *,
                 count: Callable[[Any], int] | None = None, item_name: str | None = None) -> None:
        self.fn, self.count_fn = fn, count
        self.item_name = item_name or ("samples" if count is None else "tokens")
        self.counts_samples = count is None
        self._checked = False

    def count(self, batch: Any) -> int:
        return int(self.count_fn(batch)) if self.count_fn is not None else batch_len(batch)

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        loss_sum, items = self.fn(model, batch)
        if not isinstance(loss_sum, torch.Tensor) or loss_sum.numel() != 1:
            raise LossShapeError(f"the step function returned {_shape(loss_sum)} as its loss: return (sum of "
                                 f"item losses as one tensor, item count)")
        if torch.is_grad_enabled() and model.training and not loss_sum.requires_grad:
            raise LossShapeError("the step function returned a loss without a gradient: run the model on every "
                                 "batch, an empty one included (its sum is 0 with a zero gradient)")
        if not self._checked:
            expected = self.count(batch)
            if int(items) != expected:
                raise LossShapeError(f"the step function counted {int(items)} items but count(batch) says "
                                     f"{expected}: the two must agree (the loss is divided by the global count)")
            self._checked = True
        return None, loss_sum.reshape(1)


def batch_len(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (tuple, list or dict batches)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), ())
    elif isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], (int, float)):
        batch = batch[0]
    return len(batch)
