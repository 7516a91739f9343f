"""`data.factory` for the SLURM training tests: a small float64 set whose batches take a fixed time.

Every micro-batch fetch sleeps, so an iteration lasts at least that long on any machine and a job is still
training when the test sends it the warning signal, or when it reaches its time limit. Sleeping changes no
number: every factory here gives the same samples in the same order.
"""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset

from ddp_toolkit.data import synthetic_classification

SECONDS_PER_FETCH = 0.05
"""slow_synthetic: 100 iterations of 2 micro-batches take over 10 s; signalled by hand after a few."""
FIRST_RUN_SECONDS_PER_FETCH = 0.35
"""slow_until_requeued_synthetic, in a job's first run: 100 iterations take over 70 s, more than a 1-minute
job trains before its warning; after a requeue (SLURM_RESTART_COUNT > 0), SECONDS_PER_FETCH."""
SLOWEST_SECONDS_PER_FETCH = 1.0
"""slowest_synthetic: 100 iterations take over 200 s: a 1-minute job is killed long before the end."""
SIZE = 160
SECONDS_ENV = "SLOW_DATA_SECONDS_PER_FETCH"
"""When set (sbatch passes the submitter's environment on), every factory here sleeps this long instead: the same
config, e.g. resubmitted after a time limit, can run fast without counting as a changed config."""


class SlowData(Dataset):
    """Features and labels as tensors; `__getitems__` returns one batch after `seconds_per_fetch`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seconds_per_fetch: float) -> None:
        self.x, self.y, self.seconds_per_fetch = x, y, seconds_per_fetch

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.seconds_per_fetch)
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def _synthetic(seconds_per_fetch: float) -> tuple[SlowData, None]:
    """SIZE samples, 8 features, 3 classes, already float64 (for a float64 model); no eval set."""
    train, _ = synthetic_classification(SIZE, 0, 8, 3, 0.5, 0)
    seconds_per_fetch = float(os.environ.get(SECONDS_ENV) or seconds_per_fetch)
    return SlowData(train.x.double(), train.y, seconds_per_fetch), None


def slow_synthetic() -> tuple[SlowData, None]:
    return _synthetic(SECONDS_PER_FETCH)


def slow_until_requeued_synthetic() -> tuple[SlowData, None]:
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    return _synthetic(SECONDS_PER_FETCH if requeued else FIRST_RUN_SECONDS_PER_FETCH)


def slowest_synthetic() -> tuple[SlowData, None]:
    return _synthetic(SLOWEST_SECONDS_PER_FETCH)
