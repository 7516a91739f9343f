"""Exact evaluation on 2 real gloo processes: EvalSampler + reduce_metric_sums give the 1-process accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddp_toolkit.launcher import free_port
from ddp_toolkit.sampler import EvalSampler, reduce_metric_sums

WORLD_SIZE = 2
NUM_SAMPLES = 1001
BATCH_SIZE = 64


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed features, labels and random linear classifier (10 classes), identical in every process."""
    generator = torch.Generator().manual_seed(1234)
    features = torch.randn(NUM_SAMPLES, 16, generator=generator)
    labels = torch.randint(0, 10, (NUM_SAMPLES,), generator=generator)
    weights = torch.randn(16, 10, generator=generator)
    return features, labels, weights


def _local_sums(num_samples: int, world_size: int, rank: int) -> dict[str, float]:
    """Correct predictions and sample count over this rank's EvalSampler shard of the first num_samples."""
    features, labels, weights = _data()
    correct = count = 0
    for batch in EvalSampler(num_samples, world_size, rank, BATCH_SIZE):
        predictions = (features[batch] @ weights).argmax(dim=1)
        correct += int((predictions == labels[batch]).sum())
        count += len(batch)
    return {"correct": correct, "count": count}


def _accuracy(sums: dict[str, float]) -> float:
    return sums["correct"] / sums["count"]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for num_samples in (NUM_SAMPLES, 1):  # 1 sample: rank 1 evaluates nothing but still reduces
            local = _local_sums(num_samples, WORLD_SIZE, rank)
            results[str(num_samples)] = {"local": local, "total": reduce_metric_sums(local)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_rank_accuracy_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for num_samples in (NUM_SAMPLES, 1):
        reference = _local_sums(num_samples, 1, 0)
        key = str(num_samples)
        assert [r[key]["local"]["count"] for r in ranks] == [-(-num_samples // 2), num_samples // 2]
        for r in ranks:
            assert r[key]["total"]["count"] == num_samples
            assert _accuracy(r[key]["total"]) == _accuracy(reference)
    assert 0.0 < _accuracy(_local_sums(NUM_SAMPLES, 1, 0)) < 1.0
