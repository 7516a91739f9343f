"""Exact evaluation: every held-out sample on exactly one rank, sums reduced over ranks, divided once.

The eval loss is the mean per item with the same counting as training (tokens for a token loss); perplexity
is reported for token losses, accuracy only where it is defined (class scores against class labels). A step
may add its own metrics: `step.metric_names` (a tuple, the same on every rank) and
`step.metrics(outputs, batch) -> {name: (sum, count)}`, summed over every batch and rank exactly and reported as
`eval_<name>` = sum / count.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from ddp_toolkit.batches import to_device
from ddp_toolkit.dist import DistEnv
from ddp_toolkit.sampler import EvalSampler, reduce_metric_sums

__all__ = ["Evaluator"]


class Evaluator:
    """Runs the eval set through the model every `every` iterations and at the end of the run."""

    def __init__(self, eval_set: Dataset, step, env: DistEnv, batch_size: int, collate_fn, every: int = 0) -> None:
        self.eval_set, self.step, self.env, self.every = eval_set, step, env, every
        self._user_names: tuple[str, ...] = tuple(getattr(step, "metric_names", ()))
        sampler = EvalSampler(len(eval_set), env.world_size, env.rank, batch_size)
        self.loader = DataLoader(eval_set, batch_sampler=sampler, collate_fn=collate_fn)

    def should_eval(self, iteration: int, last: bool) -> bool:
        return last or (bool(self.every) and iteration % self.every == 0)

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """eval_loss (mean per item), eval_items, eval_samples, and eval_accuracy / eval_perplexity when defined."""
        was_training = model.training
        model.eval()
        sums = {"loss": 0.0, "correct": 0.0, "items": 0.0, "samples": 0.0, "classified": 0.0}
        sums.update({f"user.{name}.{part}": 0.0 for name in self._user_names for part in ("sum", "count")})
        for batch in self.loader:
            if batch is None:
                continue
            items = self.step.count(batch)
            batch = to_device(batch, self.env.device)
            outputs, losses = self.step.forward(model, batch)
            sums["loss"] += float(losses.double().sum())
            sums["items"] += items
            targets = batch[1] if isinstance(batch, (list, tuple)) else None
            sums["samples"] += len(targets) if targets is not None else _batch_len(batch)
            if isinstance(outputs, torch.Tensor) and targets is not None and outputs.ndim == 2 and targets.ndim == 1:
                sums["correct"] += float((outputs.argmax(dim=1) == targets).sum())
                sums["classified"] += len(targets)
            self._add_user_metrics(sums, outputs, batch)
        total = reduce_metric_sums(sums, self.env.device)
        model.train(was_training)
        loss = total["loss"] / total["items"] if total["items"] else math.nan
        result = {"eval_loss": loss, "eval_items": int(total["items"]), "eval_samples": int(total["samples"])}
        if total["classified"]:
            result["eval_accuracy"] = total["correct"] / total["classified"]
        if self.step.item_name == "tokens":
            result["eval_perplexity"] = math.exp(loss) if loss < 700 else math.inf
        for name in self._user_names:
            count = total[f"user.{name}.count"]
            result[f"eval_{name}"] = total[f"user.{name}.sum"] / count if count else math.nan
        return result

    def _add_user_metrics(self, sums: dict[str, float], outputs, batch) -> None:
        """The step's own metrics (`metrics(outputs, batch) -> {name: (sum, count)}`), if it has any."""
        if not self._user_names:
            return
        values = self.step.metrics(outputs, batch)
        for name in self._user_names:  # every rank reduces the same keys, even one whose shard is empty
            value, count = values[name]
            sums[f"user.{name}.sum"] += float(value)
            sums[f"user.{name}.count"] += float(count)


def _batch_len(batch) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return len(first)
