"""`data.factory` for the SLURM training tests: a small float64 set whose batches take a fixed time.

Every micro-batch fetch sleeps SECONDS_PER_FETCH, so an iteration lasts at least that long on any machine and
a job is still training when the test sends it the warning signal. Sleeping changes no number.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import Dataset

from ddp_toolkit.data import synthetic_classification

SECONDS_PER_FETCH = 0.05
SIZE = 160


class SlowData(Dataset):
    """Features and labels as tensors; `__getitems__` returns one batch after SECONDS_PER_FETCH."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(SECONDS_PER_FETCH)
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def slow_synthetic() -> tuple[SlowData, None]:
    """SIZE samples, 8 features, 3 classes, already float64 (for a float64 model); no eval set."""
    train, _ = synthetic_classification(SIZE, 0, 8, 3, 0.5, 0)
    return SlowData(train.x.double(), train.y), None
