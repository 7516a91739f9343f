"""Data orders other than the toolkit's world-size-invariant one (sampler.py), chosen by `data.order`.

`data.order: distributed_sampler` reproduces a plain `DistributedSampler` + DDP script, so a user migrating from
one can check the toolkit against it exactly (examples/plain_ddp.py, tests/distributed/test_migration.py).
Rank r's index list of epoch e is `list(DistributedSampler(range(N), num_replicas=W, rank=r, shuffle=True,
seed=train.seed, drop_last=batch.drop_last))` after `set_epoch(e)`: torch's own class, so its permutation, its
padding (the first indices repeated up to a multiple of W) and its drop_last (the tail cut to a multiple of W)
are torch's. Micro-batches are consecutive chunks of b of that list, an iteration is k of them on every rank, and
an epoch has floor(num_samples / (b·k)) iterations, every one full (B = b·k·W samples, padding duplicates
included): a trailing partial iteration is dropped, as a script that zeroes the gradients at each epoch start
does. The order depends on W, so a resume must keep the world size.

The module imports torch only when a sampler iterates, so `recipe.plan_for` (and the CLI) stay torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from ddp_toolkit.plan import BatchPlan, PlanError, as_int

__all__ = ["DistributedSamplerBatches", "distributed_sampler_epoch", "rank_samples_per_epoch"]


def rank_samples_per_epoch(dataset_size: int, world_size: int, drop_last: bool) -> int:
    """`DistributedSampler.num_samples`: indices one rank gets per epoch (torch's own expression)."""
    if drop_last and dataset_size % world_size != 0:
        return math.ceil((dataset_size - world_size) / world_size)
    return math.ceil(dataset_size / world_size)


def distributed_sampler_epoch(dataset_size: int, *, global_batch_size: int | None, micro_batch_size: int | None,
                              world_size: int | None, grad_accum_steps: int | None, drop_last: bool) -> int:
    """N' = W · iterations · b·k: the samples one epoch of the `distributed_sampler` order trains on (padding
    duplicates included, the trailing partial iteration left out); the factors as `BatchPlan.solve` takes them."""
    plan = BatchPlan.solve(as_int("dataset_size", dataset_size), global_batch_size=global_batch_size,
                           micro_batch_size=micro_batch_size, world_size=world_size,
                           grad_accum_steps=grad_accum_steps)
    per_rank = rank_samples_per_epoch(plan.dataset_size, plan.world_size, drop_last)
    iterations = per_rank // plan.local_batch_size
    if iterations == 0:
        raise PlanError(
            f"data.order=distributed_sampler: each of world_size {plan.world_size} ranks gets {per_rank} of "
            f"dataset_size {plan.dataset_size} samples per epoch (drop_last={str(drop_last).lower()}), fewer than "
            f"micro_batch_size {plan.micro_batch_size} × grad_accum_steps {plan.grad_accum_steps} = "
            f"{plan.local_batch_size}: an epoch would have 0 iterations")
    return iterations * plan.global_batch_size


class DistributedSamplerBatches:
    """Batch sampler of the `distributed_sampler` order (module docstring) with GlobalBatchSampler's interface:
    `set_epoch`, `advance(iterations)`, `__iter__` (this rank's micro-batches, k per iteration) and `__len__`.

    `plan` must be the one `recipe.plan_for` builds for this order (its dataset_size is the epoch's N').
    """

    def __init__(self, dataset_size: int, plan: BatchPlan, rank: int, seed: int = 0) -> None:
        self.dataset_size, self.plan = as_int("dataset_size", dataset_size), plan
        self.rank, self.seed = as_int("rank", rank, 0), as_int("seed", seed, 0)
        if self.rank >= plan.world_size:
            raise PlanError(f"rank {self.rank} is out of range for world_size {plan.world_size}")
        epoch = distributed_sampler_epoch(self.dataset_size, global_batch_size=None,
                                          micro_batch_size=plan.micro_batch_size, world_size=plan.world_size,
                                          grad_accum_steps=plan.grad_accum_steps, drop_last=plan.drop_last)
        if epoch != plan.dataset_size:
            raise PlanError(f"plan dataset_size {plan.dataset_size} is not the {epoch} samples an epoch of "
                            f"data.order=distributed_sampler trains on; build the plan with recipe.plan_for")
        self.epoch = 0
        self._iterations_consumed = 0
        self._generation = 0  # bumped on every __iter__ / repositioning, so stale iterators stop counting

    @property
    def iterations_per_epoch(self) -> int:
        """floor(num_samples / (b·k)), the plan's."""
        return self.plan.iterations_per_epoch

    @property
    def iterations_consumed(self) -> int:
        """Iterations of the current epoch already handed out (or skipped)."""
        return self._iterations_consumed

    def __len__(self) -> int:
        """Micro-batches this rank still yields in the current epoch, from the resume point."""
        return (self.iterations_per_epoch - self._iterations_consumed) * self.plan.grad_accum_steps

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (torch's `set_epoch`) and rewind to its first iteration."""
        self.epoch = as_int("epoch", epoch, 0)
        self._reposition(0)

    def advance(self, iterations: int) -> None:
        """Skip `iterations` whole iterations of the current epoch without yielding them."""
        target = self._iterations_consumed + as_int("iterations", iterations, 0)
        if target > self.iterations_per_epoch:
            raise ValueError(f"cannot advance to iteration {target}: epoch {self.epoch} has "
                             f"{self.iterations_per_epoch}")
        self._reposition(target)

    def _reposition(self, iterations: int) -> None:
        self._iterations_consumed = iterations
        self._generation += 1

    def rank_indices(self) -> list[int]:
        """This rank's whole index list of the current epoch, straight from torch's DistributedSampler."""
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(self.dataset_size), num_replicas=self.plan.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=self.plan.drop_last)
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's micro-batches from the current position to the end of the epoch; an iteration
        counts as consumed when its k-th micro-batch is handed out."""
        self._generation += 1
        return self._generate(self._generation, self._iterations_consumed)

    def _generate(self, generation: int, first: int) -> Iterator[list[int]]:
        indices, b, k = self.rank_indices(), self.plan.micro_batch_size, self.plan.grad_accum_steps
        for iteration in range(first, self.iterations_per_epoch):
            for micro_step in range(k):
                start = (iteration * k + micro_step) * b
                if micro_step == k - 1 and generation == self._generation:
                    self._iterations_consumed = iteration + 1
                yield indices[start:start + b]
