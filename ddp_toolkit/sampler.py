"""World-size-invariant training sampler, exact evaluation shards and metric reduction.

Training order. Position p of an epoch's global sequence holds dataset index perm(p), perm being a seeded
bijection of [0, N) keyed by (seed, epoch) (the identity when shuffle=False). Global batch i (one
iteration) is positions [i·B, min((i+1)·B, N)). The global order therefore depends only on
(seed, epoch, N, B), never on world_size W, micro_batch_size b or grad_accum_steps k, so a checkpoint
taken at one W resumes at another W with the same B at exactly the next global batch.

Layout of one global batch of n ≤ B samples (the rule every rank applies without communication):
the batch is cut into W·k cells, cell c = micro_step·W + rank, holding the contiguous slots
[c·q + min(c, r), (c+1)·q + min(c+1, r)) of the batch, where q, r = divmod(n, W·k). For a full batch
(n = B) every cell is exactly b slots; for a short last batch cell sizes differ by at most one, the
first r cells (micro-step 0 first, then rank order) holding the extra sample, and some cells may be empty.
An empty cell still yields an empty list, so every rank yields exactly k micro-batches per iteration and
the gradient all-reduce never deadlocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from torch.utils.data._utils.collate import default_collate

from ddp_toolkit.permutation import Permutation
from ddp_toolkit.plan import BatchPlan, PlanError, as_int, cell_bounds

__all__ = ["EvalSampler", "GlobalBatchSampler", "collate_allow_empty", "reduce_metric_sums"]

# Indices permuted per vectorised call once iteration is under way (bounds memory, amortises numpy overhead).
_MAX_CHUNK_INDICES = 1 << 16


class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding this rank's micro-batches (k per iteration) of a world-size-invariant order.

    Use it as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_allow_empty)``; the layout rule
    is in the module docstring. The DataLoader iterates the batch sampler in the main process even with
    num_workers > 0, so the position tracked here stays in this object; but workers prefetch, so the count
    can run ahead of training: checkpoint with ``state_dict(iterations_done=...)`` from the trainer's counter.
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        plan = BatchPlan.solve(as_int("dataset_size", dataset_size), global_batch_size=global_batch_size,
                               micro_batch_size=micro_batch_size, world_size=world_size, drop_last=bool(drop_last))
        self._init(plan, rank, seed, shuffle)

    def _init(self, plan: BatchPlan, rank: int, seed: int, shuffle: bool) -> None:
        self.plan = plan
        self.rank = as_int("rank", rank, 0)
        if self.rank >= plan.world_size:
            raise PlanError(f"rank {self.rank} is out of range for world_size {plan.world_size}")
        self.seed = as_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._samples_consumed = 0
        self._generation = 0  # bumped on every __iter__ / repositioning, so stale iterators stop counting

    @classmethod
    def from_plan(cls, plan: Any, rank: int, seed: int = 0, shuffle: bool = True) -> GlobalBatchSampler:
        """Build from a BatchPlan (or any object with its attribute names, checked to agree)."""
        if not isinstance(plan, BatchPlan):
            real = BatchPlan.solve(plan.dataset_size, global_batch_size=plan.global_batch_size,
                                   micro_batch_size=plan.micro_batch_size, world_size=plan.world_size,
                                   drop_last=plan.drop_last)
            if plan.grad_accum_steps != real.grad_accum_steps:
                raise PlanError(
                    f"plan grad_accum_steps {plan.grad_accum_steps} disagrees with global_batch_size "
                    f"{real.global_batch_size} / (micro_batch_size {real.micro_batch_size} × "
                    f"world_size {real.world_size}) = {real.grad_accum_steps}")
            plan = real
        sampler = cls.__new__(cls)
        sampler._init(plan, rank, seed, shuffle)
        return sampler

    # the plan's numbers under the names the sampler has always had
    dataset_size = property(lambda self: self.plan.dataset_size)
    global_batch_size = property(lambda self: self.plan.global_batch_size)
    micro_batch_size = property(lambda self: self.plan.micro_batch_size)
    world_size = property(lambda self: self.plan.world_size)
    grad_accum_steps = property(lambda self: self.plan.grad_accum_steps)
    drop_last = property(lambda self: self.plan.drop_last)

    # ----------------------------------------------------------------------------------------- counting
    @property
    def iterations_per_epoch(self) -> int:
        """Global batches per epoch (the plan's): ⌈N/B⌉, or ⌊N/B⌋ with drop_last."""
        return self.plan.iterations_per_epoch

    @property
    def samples_consumed(self) -> int:
        """Global samples (all ranks) of the current epoch whose iteration has been handed out or skipped."""
        return self._samples_consumed

    @property
    def iterations_consumed(self) -> int:
        """Iterations of the current epoch already handed out (or skipped), counted in batches of this plan's B."""
        return -(-self._samples_consumed // self.global_batch_size)

    @property
    def iterations_left(self) -> int:
        """Iterations still to come in the current epoch from the current position (in batches of this plan's B)."""
        left = self.dataset_size - self._samples_consumed
        return left // self.global_batch_size if self.drop_last else -(-left // self.global_batch_size)

    def __len__(self) -> int:
        """Micro-batches this rank still yields in the current epoch, from the resume point (not from 0)."""
        return max(0, self.iterations_left) * self.grad_accum_steps

    def _check_iteration(self, iteration: int) -> int:
        iteration = as_int("iteration", iteration, 0)
        if iteration >= self.iterations_per_epoch:
            raise IndexError(f"iteration {iteration} out of range: epoch has {self.iterations_per_epoch}")
        return iteration

    def global_count(self, iteration: int) -> int:
        """Samples in global batch `iteration` (B, fewer in a short last batch): the divisor of the loss."""
        return self.plan.batch_size_of(self._check_iteration(iteration))

    def micro_batch_sizes(self, iteration: int) -> list[list[int]]:
        """Sample counts as [micro_step][rank] for global batch `iteration`; known on every rank, no comms."""
        return self.plan.split_counts(self.global_count(iteration))

    def rank_count(self, iteration: int) -> int:
        """Samples this rank processes in global batch `iteration` (sum over its k micro-batches)."""
        return sum(row[self.rank] for row in self.micro_batch_sizes(iteration))

    def global_batch(self, iteration: int) -> list[int]:
        """Dataset indices of global batch `iteration` in global order; for checks and debugging."""
        n, start = self.global_count(iteration), iteration * self.global_batch_size
        return self._indices(np.arange(start, start + n, dtype=np.int64), self._permutation()).tolist()

    # ------------------------------------------------------------------------------------- positioning
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order is keyed by (seed, epoch)) and rewind to its first iteration."""
        self.epoch = as_int("epoch", epoch, 0)
        self._reposition(0)

    def advance(self, iterations: int) -> None:
        """Skip `iterations` whole iterations of the current epoch without yielding them (fast-forward)."""
        iterations = as_int("iterations", iterations, 0)
        if iterations > self.iterations_left:
            raise ValueError(f"cannot advance {iterations} iterations: epoch {self.epoch} has {self.iterations_left} "
                             f"left")
        self._reposition(min(self._samples_consumed + iterations * self.global_batch_size, self.dataset_size))

    def seek(self, epoch_position: int) -> None:
        """Continue the current epoch at position `epoch_position` of its global order (any position: a batch-size
        schedule may have changed B mid-epoch, so the next batch need not start at a multiple of this B)."""
        position = as_int("epoch_position", epoch_position, 0)
        if position > self.dataset_size:
            raise ValueError(f"epoch_position {position} is past the end of the epoch ({self.dataset_size} samples)")
        self._reposition(position)

    def set_plan(self, plan: BatchPlan) -> None:
        """Switch to another phase of a batch-size schedule (another B and k; N, W, b and drop_last unchanged).
        The position stays; the next iterator yields batches of the new B from it."""
        old = self.plan
        if (plan.dataset_size, plan.world_size, plan.drop_last) != (old.dataset_size, old.world_size, old.drop_last):
            raise PlanError(f"set_plan: a new phase keeps dataset_size {old.dataset_size}, world_size "
                            f"{old.world_size} and drop_last {old.drop_last}")
        self.plan = plan
        self._generation += 1

    def _reposition(self, samples_consumed: int) -> None:
        self._samples_consumed = samples_consumed
        self._generation += 1

    def state_dict(self, iterations_done: int | None = None) -> dict[str, int]:
        """Resume state. By default the position is the sampler's own count of handed-out iterations; pass
        `iterations_done` (this epoch's completed iterations, as the trainer counts them) when the DataLoader
        prefetches batches ahead of training (num_workers > 0)."""
        consumed = self._samples_consumed
        if iterations_done is not None:
            done = as_int("iterations_done", iterations_done, 0)
            if done > self.iterations_per_epoch:
                raise ValueError(
                    f"iterations_done {done} exceeds iterations_per_epoch {self.iterations_per_epoch}"
                )
            consumed = min(done * self.global_batch_size, self.dataset_size)
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "samples_consumed": consumed,
            "global_batch_size": self.global_batch_size,
            "dataset_size": self.dataset_size,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore seed, epoch and position; W and b may differ, B and N must match (else ValueError)."""
        for key, mine in (("global_batch_size", self.global_batch_size), ("dataset_size", self.dataset_size)):
            if int(state[key]) != mine:
                raise ValueError(
                    f"cannot resume: checkpoint {key} {int(state[key])} differs from this sampler's {mine}; "
                    "the global order depends on it"
                )
        consumed = as_int("samples_consumed", state["samples_consumed"], 0)
        boundary = consumed % self.global_batch_size == 0 or consumed == self.dataset_size
        if consumed > self.dataset_size or not boundary:
            raise ValueError(
                f"samples_consumed {consumed} is not an iteration boundary for dataset_size "
                f"{self.dataset_size} and global_batch_size {self.global_batch_size}"
            )
        self.seed = as_int("seed", state["seed"], 0)
        self.epoch = as_int("epoch", state["epoch"], 0)
        self._reposition(consumed)

    # --------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's micro-batches from the current position to the end of the current epoch.

        An iteration counts as consumed when its k-th micro-batch is handed out. Call set_epoch(e + 1) to
        start the next epoch; iterating again without it yields nothing once the epoch is finished.
        """
        self._generation += 1
        return self._generate(self._generation, self._samples_consumed)

    def _generate(self, generation: int, position: int) -> Iterator[list[int]]:
        perm, n, size, k = self._permutation(), self.dataset_size, self.global_batch_size, self.grad_accum_steps
        end = n - size + 1 if self.drop_last else n  # an iteration may start below `end` (drop_last: a full one)
        block_iterations, max_block = 1, max(1, _MAX_CHUNK_INDICES // (self.micro_batch_size * k))
        while position < end:
            # Permute several iterations' positions in one vectorised call; the block grows so the first
            # batch comes out fast.
            block = range(position, min(end, position + block_iterations * size), size)
            position = block[-1] + size
            positions, sizes = self._rank_positions(block)
            indices = self._indices(positions, perm).tolist()
            offset = 0
            for start, row in zip(block, sizes, strict=True):
                for micro_step, count in enumerate(row):
                    batch, offset = indices[offset : offset + count], offset + count
                    if micro_step == k - 1 and generation == self._generation:
                        self._samples_consumed = min(start + size, n)
                    yield batch
            block_iterations = min(2 * block_iterations, max_block)

    def _rank_positions(self, starts: range) -> tuple[np.ndarray, list[list[int]]]:
        """Epoch positions of this rank's cells in the iterations starting at `starts`, and their sizes per
        [iteration][micro_step] (the plan's layout rule, `cell_range_at`)."""
        pieces, sizes = [], []
        for start in starts:
            count, row = min(self.global_batch_size, self.dataset_size - start), []
            for micro_step in range(self.grad_accum_steps):
                first, stop = self.plan.cell_range_at(start, count, micro_step, self.rank)
                pieces.append(np.arange(first, stop, dtype=np.int64))
                row.append(stop - first)
            sizes.append(row)
        return np.concatenate(pieces), sizes

    def _permutation(self) -> Permutation | None:
        return Permutation(self.dataset_size, self.seed, self.epoch) if self.shuffle else None

    @staticmethod
    def _indices(positions: np.ndarray, perm: Permutation | None) -> np.ndarray:
        return positions if perm is None else perm(positions)


def collate_allow_empty(batch: list[Any], collate_fn: Callable[[list[Any]], Any] = default_collate) -> Any:
    """Collate function that returns None for an empty micro-batch (default_collate fails on []).

    Pass ``collate_fn=collate_allow_empty`` to the DataLoader, or a functools.partial with your collate_fn.
    """
    return None if len(batch) == 0 else collate_fn(batch)


class EvalSampler(Sampler[list[int]]):
    """Exact evaluation shard: each index in [0, N) goes to exactly one rank, no padding, no duplicates.

    Rank r gets the contiguous range [r·q + min(r, s), (r+1)·q + min(r+1, s)) with q, s = divmod(N, W), so
    counts differ by at most one and may be 0. Ranks run different numbers of forward passes: evaluate the
    unwrapped module (no per-batch collectives) and combine with `reduce_metric_sums`.
    """

    def __init__(self, dataset_size: int, world_size: int, rank: int, batch_size: int) -> None:
        self.dataset_size = as_int("dataset_size", dataset_size, 0)
        self.world_size = as_int("world_size", world_size, 1)
        self.rank = as_int("rank", rank, 0)
        self.batch_size = as_int("batch_size", batch_size, 1)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is out of range for world_size {self.world_size}")
        self.start, stop = cell_bounds(self.dataset_size, self.world_size, self.rank)
        self.num_samples = stop - self.start

    def __len__(self) -> int:
        """Batches of this rank (the last one may be short)."""
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        stop = self.start + self.num_samples
        for first in range(self.start, stop, self.batch_size):
            yield list(range(first, min(first + self.batch_size, stop)))


def reduce_metric_sums(
    sums: Mapping[str, float], device: torch.device | str | None = None, group: Any = None
) -> dict[str, float]:
    """Sum metric numerators and counts over all ranks (float64 all-reduce); identity without a process group.

    Every rank must pass the same keys. Reduce sums (e.g. ``{"correct": 37, "count": 50}``) and divide
    afterwards: integer sums below 2**53 are exact, so accuracy equals the single-process value exactly.
    """
    keys = sorted(sums)
    if not (dist.is_available() and dist.is_initialized()):
        return {key: float(sums[key]) for key in keys}
    if device is None:
        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    values = torch.tensor([float(sums[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, values.tolist(), strict=True))
