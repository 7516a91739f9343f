"""Built-in data: a seeded synthetic classification set and scikit-learn's bundled digits.

Both are `TensorData`: whole batches are gathered by one tensor index, so a micro-batch of any size,
including an empty one, costs one indexing operation.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["TensorData", "build_data", "load_factory", "synthetic_classification", "digits"]


class TensorData(Dataset):
    """Features and labels held as tensors; `__getitems__` returns one batch (x, y) for a list of indices."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"features ({len(x)}) and labels ({len(y)}) differ in length")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]

    @property
    def num_features(self) -> int:
        return int(np.prod(self.x.shape[1:]))


def synthetic_classification(size: int, eval_size: int, features: int, classes: int, noise: float,
                             seed: int) -> tuple[TensorData, TensorData]:
    """Gaussian inputs labelled by a random linear teacher with logit noise; train and eval from one draw."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((features, classes)) / np.sqrt(features)
    total = size + eval_size
    x = rng.standard_normal((total, features)).astype(np.float32)
    logits = x @ teacher * 3.0 + noise * rng.standard_normal((total, classes))
    y = logits.argmax(axis=1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    return TensorData(xt[:size], yt[:size]), TensorData(xt[size:], yt[size:])


def digits(seed: int = 0) -> tuple[TensorData, TensorData]:
    """scikit-learn's bundled 8×8 digits (1797 images, no download): 1437 train / 360 eval, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    return TensorData(x[:1437], y[:1437]), TensorData(x[1437:], y[1437:])


def load_factory(spec: str, key: str):
    """Resolve `module:function`; a bad spec is one ValueError line naming the config key."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key}: {spec!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key}: cannot import module {module_name!r} ({err})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{key}: module {module_name!r} has no attribute {attr!r}") from None


def build_data(cfg) -> tuple[Dataset, Dataset | None]:
    """The (train, eval) sets named by a DataConfig."""
    if cfg.name == "synthetic":
        return synthetic_classification(cfg.size, cfg.eval_size, cfg.features, cfg.classes, cfg.noise, cfg.seed)
    if cfg.name == "digits":
        return digits(cfg.seed)
    return load_factory(cfg.factory, "data.factory")()
