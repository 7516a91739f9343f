"""data.order=distributed_sampler in one process: every simulated rank's micro-batches are consecutive chunks of
torch's own DistributedSampler list, and the plan counts exactly the iterations and samples that order yields."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from ddp_toolkit.config import validate
from ddp_toolkit.orders import DistributedSamplerBatches, rank_samples_per_epoch
from ddp_toolkit.plan import PlanError
from ddp_toolkit.recipe import plan_for


def _config(b: int, k: int, drop_last: bool, order: str = "distributed_sampler"):
    return validate({"data": {"order": order}, "train": {"seed": 5},
                     "batch": {"micro_batch_size": b, "grad_accum_steps": k, "drop_last": drop_last}})


def _torch_list(n: int, w: int, r: int, drop_last: bool, epoch: int) -> list[int]:
    sampler = DistributedSampler(range(n), num_replicas=w, rank=r, shuffle=True, seed=5, drop_last=drop_last)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("n", "w", "b", "k"), [(41, 2, 4, 2), (40, 2, 4, 2), (23, 3, 2, 3), (7, 1, 3, 2),
                                                (50, 4, 3, 1)])
def test_micro_batches_are_chunks_of_torchs_list(n, w, b, k, drop_last):
    plan = plan_for(_config(b, k, drop_last), n, w)
    per_rank = rank_samples_per_epoch(n, w, drop_last)
    assert per_rank == DistributedSampler(range(n), num_replicas=w, rank=0, drop_last=drop_last).num_samples
    assert plan.iterations_per_epoch == per_rank // (b * k)
    assert plan.dataset_size == w * plan.iterations_per_epoch * b * k
    assert plan.samples_for(3 * plan.iterations_per_epoch) == 3 * plan.dataset_size
    assert all(plan.batch_size_of(i) == b * k * w for i in range(plan.iterations_per_epoch))
    for epoch in (0, 1):
        for r in range(w):
            sampler = DistributedSamplerBatches(n, plan, r, seed=5)
            sampler.set_epoch(epoch)
            assert len(sampler) == plan.iterations_per_epoch * k
            got = list(sampler)
            assert all(len(mb) == b for mb in got) and len(got) == plan.iterations_per_epoch * k
            expected = _torch_list(n, w, r, drop_last, epoch)
            assert sum(got, []) == expected[:len(got) * b]  # the trailing partial iteration is dropped
            assert len(sampler) == 0 and list(sampler) == []  # the epoch is finished


def test_advance_set_epoch_and_errors():
    plan = plan_for(_config(2, 2, False), 41, 2)  # 21 per rank, 5 iterations of 4
    sampler = DistributedSamplerBatches(41, plan, 1, seed=5)
    full = list(sampler)
    sampler.set_epoch(0)
    sampler.advance(3)
    assert len(sampler) == 4 and list(sampler) == full[6:]
    sampler.set_epoch(1)
    assert list(sampler) != full  # a new epoch, a new permutation
    with pytest.raises(ValueError, match="cannot advance"):
        sampler.advance(1)
    with pytest.raises(PlanError, match="recipe.plan_for"):  # a plan of the global order
        DistributedSamplerBatches(41, plan_for(_config(2, 2, False, "global"), 41, 2), 0)
    with pytest.raises(PlanError, match="0 iterations"):
        plan_for(_config(4, 2, True), 15, 2)  # 7 per rank < b·k = 8
    assert plan_for(_config(4, 2, False), 15, 2).iterations_per_epoch == 1  # padded to 8 per rank


def test_global_order_plan_is_unchanged():
    assert plan_for(_config(4, 2, False, "global"), 41, 2).dataset_size == 41
