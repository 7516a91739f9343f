"""GlobalBatchSampler and EvalSampler, tested in one process by building every simulated rank's shard."""

from __future__ import annotations

import itertools
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from ddp_toolkit.permutation import Permutation
from ddp_toolkit.sampler import EvalSampler, GlobalBatchSampler, collate_allow_empty, reduce_metric_sums

Cells = list[list[list[int]]]  # [micro_step][rank] -> dataset indices


def _samplers(n: int, b: int, k: int, w: int, **kwargs) -> list[GlobalBatchSampler]:
    return [GlobalBatchSampler(n, b * k * w, b, w, rank, **kwargs) for rank in range(w)]


def _iterations(samplers: list[GlobalBatchSampler], limit: int | None = None) -> list[Cells]:
    """Run every rank's iterator and regroup into iterations of [micro_step][rank] cells."""
    k, w = samplers[0].grad_accum_steps, len(samplers)
    streams = [list(itertools.islice(iter(s), None if limit is None else limit * k)) for s in samplers]
    assert len({len(stream) for stream in streams}) == 1, "ranks yielded different numbers of micro-batches"
    assert len(streams[0]) % k == 0
    return [
        [[streams[r][i * k + m] for r in range(w)] for m in range(k)] for i in range(len(streams[0]) // k)
    ]


def _flatten(cells: Cells) -> list[int]:
    """Concatenate cells in layout order c = micro_step·W + rank: reconstructs the global batch."""
    return [index for row in cells for cell in row for index in cell]


configs = st.fixed_dictionaries(
    {
        "n": st.integers(1, 300),
        "b": st.integers(1, 6),
        "k": st.integers(1, 4),
        "w": st.integers(1, 4),
        "seed": st.integers(0, 2**32),
        "epoch": st.integers(0, 5),
        "drop_last": st.booleans(),
        "shuffle": st.booleans(),
    }
)


@settings(max_examples=80, deadline=None)
@given(cfg=configs)
def test_shards_reassemble_the_world_size_invariant_global_batches(cfg: dict) -> None:
    n, b, k, w, epoch = cfg["n"], cfg["b"], cfg["k"], cfg["w"], cfg["epoch"]
    opts = {"seed": cfg["seed"], "shuffle": cfg["shuffle"], "drop_last": cfg["drop_last"]}
    B = b * k * w
    if cfg["drop_last"] and n < B:  # an epoch of 0 iterations: the plan refuses it, so the sampler does too
        with pytest.raises(ValueError, match=rf"dataset_size {n} is smaller than global_batch_size {B}"):
            _samplers(n, b, k, w, **opts)
        return
    samplers = _samplers(n, b, k, w, **opts)
    reference = GlobalBatchSampler(n, B, B, 1, 0, **opts)  # W = 1, k = 1, same B
    for sampler in [*samplers, reference]:
        sampler.set_epoch(epoch)
    expected_len = reference.iterations_per_epoch * k
    assert all(len(s) == expected_len for s in samplers)
    iterations = _iterations(samplers)
    assert len(iterations) == reference.iterations_per_epoch == (n // B if cfg["drop_last"] else -(-n // B))
    assert [_flatten(cells) for cells in iterations] == [batch for batch in reference]
    seen: list[int] = []
    for i, cells in enumerate(iterations):
        sizes = [[len(cell) for cell in row] for row in cells]
        assert sizes == samplers[0].micro_batch_sizes(i)
        assert sum(map(sum, sizes)) == samplers[0].global_count(i) == len(reference.global_batch(i))
        flat = [size for row in sizes for size in row]
        assert max(flat) - min(flat) <= 1 and max(flat) <= b
        if samplers[0].global_count(i) == B:
            assert set(flat) == {b}
        assert all(s.rank_count(i) == sum(row[s.rank] for row in sizes) for s in samplers)
        seen += _flatten(cells)
    assert len(seen) == len(set(seen))
    if cfg["drop_last"]:
        assert len(seen) == n - n % B and set(seen) <= set(range(n))
    else:
        assert sorted(seen) == list(range(n))
    if not cfg["shuffle"]:
        assert seen == list(range(len(seen)))
    assert all(s.samples_consumed == len(seen) and len(s) == 0 for s in samplers)


def test_epochs_differ_and_repeat_per_seed() -> None:
    sampler = GlobalBatchSampler(1000, 64, 8, 2, 1, seed=5)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(map(sorted, second)) != sorted(map(sorted, first))
    assert list(GlobalBatchSampler(1000, 64, 8, 2, 1, seed=6)) != first


def test_epoch_iterates_from_position_to_end_then_stays_empty() -> None:
    sampler = GlobalBatchSampler(100, 16, 2, 2, 0)  # k = 4, 7 iterations
    assert sampler.iterations_per_epoch == 7 and len(sampler) == 28
    assert len(list(sampler)) == 28
    assert list(sampler) == [] and len(sampler) == 0
    sampler.set_epoch(1)
    assert len(sampler) == 28 and sampler.samples_consumed == 0


@settings(max_examples=40, deadline=None)
@given(
    pair=st.lists(st.sampled_from([(1, 1), (2, 1), (1, 2), (4, 2), (2, 3), (3, 4), (6, 2), (1, 12)]),
                  min_size=2, max_size=2, unique=True),
    n=st.integers(1, 200),
    stop=st.integers(0, 20),
    seed=st.integers(0, 1000),
    drop_last=st.booleans(),
)
def test_resume_at_another_world_size_continues_the_same_global_order(
    pair: list[tuple[int, int]], n: int, stop: int, seed: int, drop_last: bool
) -> None:
    B = 24
    assume(not (drop_last and n < B))  # an epoch of 0 iterations is refused (see the test above)
    (b1, w1), (b2, w2) = pair
    opts = {"seed": seed, "drop_last": drop_last}
    full = [i for cells in _iterations(_samplers(n, b1, B // (b1 * w1), w1, **opts)) for i in _flatten(cells)]
    before = _samplers(n, b1, B // (b1 * w1), w1, **opts)
    for s in before:
        s.set_epoch(0)
    seen = [i for cells in _iterations(before, limit=stop) for i in _flatten(cells)]
    states = [s.state_dict() for s in before]
    assert all(state == states[0] for state in states)
    assert states[0]["samples_consumed"] == len(seen)
    after = _samplers(n, b2, B // (b2 * w2), w2, seed=seed + 1, drop_last=drop_last)
    for s in after:
        s.load_state_dict(states[0])
    rest = [i for cells in _iterations(after) for i in _flatten(cells)]
    assert seen + rest == full
    assert not set(seen) & set(rest)


def test_resume_rejects_changed_global_batch_or_dataset_size_and_bad_positions() -> None:
    state = GlobalBatchSampler(100, 16, 4, 2, 0).state_dict()
    with pytest.raises(ValueError, match=r"global_batch_size 16 .* 32"):
        GlobalBatchSampler(100, 32, 4, 2, 0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"dataset_size 100 .* 101"):
        GlobalBatchSampler(101, 16, 4, 2, 0).load_state_dict(state)
    for bad in (5, 101, -16):
        with pytest.raises(ValueError):
            GlobalBatchSampler(100, 16, 4, 2, 0).load_state_dict({**state, "samples_consumed": bad})
    GlobalBatchSampler(100, 16, 4, 2, 0).load_state_dict({**state, "samples_consumed": 100})  # epoch end


def test_state_dict_keys_and_trainer_supplied_position() -> None:
    sampler = GlobalBatchSampler(100, 16, 4, 2, 1, seed=3)
    sampler.set_epoch(2)
    stream = iter(sampler)
    for _ in range(5):  # k = 2: iterations 0 and 1 handed out, half of iteration 2
        next(stream)
    assert sampler.state_dict() == {
        "seed": 3, "epoch": 2, "samples_consumed": 32, "global_batch_size": 16, "dataset_size": 100,
    }
    assert sampler.state_dict(iterations_done=1)["samples_consumed"] == 16
    assert sampler.state_dict(iterations_done=7)["samples_consumed"] == 100
    with pytest.raises(ValueError):
        sampler.state_dict(iterations_done=8)


def test_advance_skips_whole_iterations_and_len_counts_from_the_resume_point() -> None:
    direct = GlobalBatchSampler(100, 16, 4, 2, 1, seed=3)
    skipped = GlobalBatchSampler(100, 16, 4, 2, 1, seed=3)
    skipped.advance(3)
    assert skipped.samples_consumed == 48 and skipped.iterations_consumed == 3
    assert len(skipped) == (7 - 3) * 2
    assert list(skipped) == list(direct)[3 * 2:]
    skipped.set_epoch(0)
    skipped.advance(7)
    assert skipped.samples_consumed == 100 and list(skipped) == []
    with pytest.raises(ValueError):
        skipped.advance(1)


def test_stale_iterator_stops_updating_the_position() -> None:
    sampler = GlobalBatchSampler(100, 16, 8, 2, 0)  # k = 1
    old = iter(sampler)
    next(old)
    sampler.set_epoch(1)
    next(old)
    assert sampler.samples_consumed == 0 and sampler.epoch == 1


def test_validation_messages_name_every_factor() -> None:
    with pytest.raises(ValueError, match=r"global_batch_size 50 .*micro_batch_size 4 .*world_size 3 .*12"):
        GlobalBatchSampler(100, 50, 4, 3, 0)
    with pytest.raises(ValueError, match="rank 2"):
        GlobalBatchSampler(100, 16, 4, 2, 2)
    with pytest.raises(ValueError):
        GlobalBatchSampler(0, 16, 4, 2, 0)
    with pytest.raises(TypeError):
        GlobalBatchSampler(100, 16.0, 4, 2, 0)
    with pytest.raises(IndexError):
        GlobalBatchSampler(100, 16, 4, 2, 0).global_count(7)


def test_from_plan_duck_types_the_plan() -> None:
    plan = SimpleNamespace(dataset_size=100, global_batch_size=24, micro_batch_size=2, world_size=3,
                           grad_accum_steps=4, drop_last=True)
    sampler = GlobalBatchSampler.from_plan(plan, rank=2, seed=9)
    assert (sampler.grad_accum_steps, sampler.drop_last, sampler.seed, sampler.rank) == (4, True, 9, 2)
    with pytest.raises(ValueError, match="grad_accum_steps 3"):
        GlobalBatchSampler.from_plan(SimpleNamespace(**{**vars(plan), "grad_accum_steps": 3}), rank=0)


def test_split_agrees_with_batch_plan() -> None:
    plan_module = pytest.importorskip("ddp_toolkit.plan")
    plan = plan_module.BatchPlan(dataset_size=1003, micro_batch_size=4, world_size=3, grad_accum_steps=5)
    sampler = GlobalBatchSampler.from_plan(plan, rank=0)
    assert sampler.iterations_per_epoch == plan.iterations_per_epoch
    for i in range(sampler.iterations_per_epoch):
        assert sampler.micro_batch_sizes(i) == plan.split_counts(sampler.global_count(i))


@pytest.mark.parametrize("n", [1024 * 10**4 + 7, 10**12 + 7])
def test_huge_dataset_is_never_materialised(monkeypatch, n: int) -> None:
    # O(b) work and memory, not O(N): count the positions handed to the permutation and bound the peak of
    # Python and numpy allocations (tracemalloc sees both). At N = 10^7 a materialised order would take 80 MB.
    permuted: list[int] = []
    original = Permutation.__call__

    def counting(self, positions):
        permuted.append(int(np.asarray(positions).size))
        return original(self, positions)

    monkeypatch.setattr(Permutation, "__call__", counting)
    tracemalloc.start()
    try:
        sampler = GlobalBatchSampler(n, 1024, 32, 8, 3, seed=1)
        first = next(iter(sampler))
        last = sampler.global_batch(sampler.iterations_per_epoch - 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(first) == 32 and len(last) == n % 1024 == 7
    assert all(0 <= index < n for index in first + last)
    assert permuted == [32 * 4, 7]  # this rank's cells of one iteration (b·k, k = 1024/(32·8)), the last batch
    assert peak < 1 << 20, f"peak {peak} bytes"


class _IndexDataset(Dataset):
    """Returns its index, so a DataLoader's output shows which indices the sampler produced."""

    def __len__(self) -> int:
        return 35

    def __getitem__(self, index: int) -> int:
        return index


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_batch_sampler_yields_the_direct_indices(num_workers: int) -> None:
    # N = 35, B = 16: the last global batch has 3 samples over 4 cells, so rank 1's last micro-batch is empty.
    expected = list(GlobalBatchSampler(35, 16, 4, 2, 1, seed=4))
    assert expected[-1] == []
    sampler = GlobalBatchSampler(35, 16, 4, 2, 1, seed=4)
    loader = DataLoader(_IndexDataset(), batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_allow_empty)
    got = [[] if batch is None else batch.tolist() for batch in loader]
    assert got == expected
    assert sampler.samples_consumed == 35


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), w=st.integers(1, 6), batch_size=st.integers(1, 7))
def test_eval_sampler_gives_each_index_to_exactly_one_rank(n: int, w: int, batch_size: int) -> None:
    shards = [EvalSampler(n, w, rank, batch_size) for rank in range(w)]
    batches = [list(shard) for shard in shards]
    assert [len(b) for b in batches] == [len(shard) for shard in shards]
    assert all(len(batch) <= batch_size for per_rank in batches for batch in per_rank)
    flat = [index for per_rank in batches for batch in per_rank for index in batch]
    assert flat == list(range(n))
    counts = [shard.num_samples for shard in shards]
    assert max(counts) - min(counts) <= 1 and sum(counts) == n


def test_reduce_metric_sums_is_identity_without_a_process_group() -> None:
    assert not torch.distributed.is_initialized()
    assert reduce_metric_sums({"count": 3, "correct": 2.5}) == {"correct": 2.5, "count": 3.0}
