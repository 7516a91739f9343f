"""Tests written to kill mutants that survived `benchmarks/mutation.py` (see tests/README.md)."""

from __future__ import annotations

import numpy as np
import pytest

from ddp_toolkit.permutation import Permutation
from ddp_toolkit.plan import BatchPlan, PlanError


@pytest.mark.parametrize(("seed", "epoch"), [(-1, 0), (0, -1)])
def test_permutation_refuses_a_negative_seed_or_epoch_alone(seed: int, epoch: int) -> None:
    with pytest.raises(ValueError, match="must be non-negative"):
        Permutation(10, seed=seed, epoch=epoch)


def test_permutation_order_is_pinned() -> None:
    # The order of (n, seed, epoch) is the global data order of every run: a checkpoint written by one version
    # resumes in another only if it is unchanged. These values were computed once, by this version, on purpose.
    assert [Permutation(10)[i] for i in range(10)] == [2, 4, 9, 6, 3, 0, 5, 1, 8, 7]
    assert Permutation(1000, seed=7, epoch=2)(np.arange(0, 1000, 97)).tolist() == [
        788, 843, 332, 799, 648, 815, 656, 885, 293, 191, 749]
    assert Permutation(2**40 + 3, seed=1)(np.array([0, 1, 2**40 + 2])).tolist() == [
        656781337737, 958107476057, 697149068122]
    # small n and n at a power of two: the Feistel width is that of n − 1, at least 2 bits
    assert [Permutation(4, seed=3)[i] for i in range(4)] == [2, 3, 1, 0]
    assert [Permutation(1024, seed=5)[i] for i in (0, 1, 1023)] == [993, 380, 276]


# ---- plan.py: survivors of test_plan.py alone (test_sampler.py covers some of them indirectly) ----------------
def _plan(**factors) -> BatchPlan:
    return BatchPlan.solve(19, **{"global_batch_size": 16, "micro_batch_size": 4, "world_size": 2, **factors})


def test_plan_keeps_the_short_last_batch_by_default() -> None:
    plan = _plan()
    assert (plan.iterations_per_epoch, plan.batch_size_of(0), plan.batch_size_of(1)) == (2, 16, 3)
    assert plan.samples_for(3) == 19 + 16 and plan.iterations_in("2ep") == 4 and plan.iterations_in(3) == 3


@pytest.mark.parametrize("iteration", [-1, 2])
def test_batch_size_of_refuses_iterations_outside_the_epoch(iteration: int) -> None:
    with pytest.raises(PlanError):
        _plan().batch_size_of(iteration)


def test_cell_range_by_hand() -> None:
    plan = _plan(grad_accum_steps=2)  # cell c = micro_step·W + rank; a short batch of 3 over 4 cells: 1, 1, 1, 0
    cells = {(m, r): plan.cell_range(1, m, r) for m in range(2) for r in range(2)}
    assert cells == {(0, 0): (16, 17), (0, 1): (17, 18), (1, 0): (18, 19), (1, 1): (19, 19)}
    assert plan.cell_range(0, 1, 1) == (12, 16)
    for micro_step, rank in [(2, 0), (0, 2), (-1, 0), (0, -1)]:
        with pytest.raises(PlanError):
            plan.cell_range(0, micro_step, rank)


def test_all_four_consistent_factors_are_accepted() -> None:
    assert _plan(grad_accum_steps=2).grad_accum_steps == 2
