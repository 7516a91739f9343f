"""Built-in data: a seeded synthetic classification set, scikit-learn's bundled digits, and byte-level text from
the Python standard library's own source files (every machine with Python has them: no download).

The classification sets are `TensorData`: whole batches are gathered by one tensor index, so a micro-batch of any
size, including an empty one, costs one indexing operation. The text set holds variable-length byte sequences;
`pad_tokens` / `pad_tokens_dict` pad each micro-batch to its own longest sequence (the `data.collate` functions).
`DataInfo` says what a model factory needs to know about the data.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ByteSequences", "CollatedData", "DataInfo", "TensorData", "build_data", "data_info", "digits",
           "load_factory", "pad_tokens", "pad_tokens_dict", "stdlib_text", "synthetic_classification"]

IGNORE_INDEX = -100
"""Label of a padded position: not a loss item (PyTorch's and Hugging Face's convention)."""


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
    """Resolve `module:function`; a bad spec is one ValueError line naming the config key.

    The current working directory is importable (as for `python -m`), so `my_model:build` finds my_model.py
    next to where the run is started; other modules must be on PYTHONPATH.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key}: {spec!r} is not of the form 'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # after site-packages: a local file never shadows an installed module
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key}: cannot import module {module_name!r} ({err}); put {module_name}.py in the "
                         f"current directory or its folder on PYTHONPATH") from None
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
    if cfg.name == "text":
        return stdlib_text(cfg.size, cfg.eval_size, cfg.seq_len)
    return load_factory(cfg.factory, "data.factory")()


# ---- byte-level text -----------------------------------------------------------------------------------------
class ByteSequences(Dataset):
    """Variable-length byte sequences (1-D int64 tensors of 2 … seq_len + 1 ids: inputs and next-byte targets)."""

    def __init__(self, sequences: list[bytes], seq_len: int) -> None:
        self.sequences, self.seq_len = sequences, seq_len
        self.info = DataInfo(vocab_size=256, seq_len=seq_len)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.sequences[index]), dtype=torch.uint8).long()


def _text_files() -> list[Path]:
    """The standard library's top-level .py files, then this package's own (both sorted: a fixed order)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py")) + sorted(Path(__file__).resolve().parent.rglob("*.py"))


def _chunks(text: bytes, longest: int):
    """Whole lines packed into chunks of at most `longest` bytes (a longer line is cut): variable lengths."""
    chunk = b""
    for line in text.splitlines(keepends=True):
        line = line[:longest]
        if chunk and len(chunk) + len(line) > longest:
            yield chunk
            chunk = b""
        chunk += line
    if len(chunk) >= 2:
        yield chunk


def stdlib_text(size: int, eval_size: int, seq_len: int) -> tuple[ByteSequences, ByteSequences]:
    """`size` + `eval_size` sequences of whole lines of Python source (≤ seq_len + 1 bytes each), read from the
    standard library's files in a fixed order: train first, eval from the text after it."""
    need, out = size + eval_size, []
    for path in _text_files():
        try:
            text = path.read_bytes()
        except OSError:
            continue
        out.extend(c for c in _chunks(text, seq_len + 1) if len(c) >= 2)
        if len(out) >= need:
            break
    if len(out) < need:
        raise ValueError(f"data.name=text: data.size + data.eval_size = {need} sequences, but the standard "
                         f"library's source holds only {len(out)} at data.seq_len {seq_len}")
    return ByteSequences(out[:size], seq_len), ByteSequences(out[size:need], seq_len)


def _padded(samples: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(len(s) for s in samples)
    out = torch.full((len(samples), width), value, dtype=torch.long)
    for row, s in zip(out, samples, strict=True):
        row[:len(s)] = s
    return out


def pad_tokens(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for language modelling on `(inputs, targets)`: sequence s gives inputs s[:-1] and targets s[1:],
    padded to the micro-batch's longest; padded targets are -100 (not items), padded inputs 0."""
    inputs = _padded([s[:-1] for s in samples], 0)
    targets = _padded([s[1:] for s in samples], IGNORE_INDEX)
    return inputs, targets


def pad_tokens_dict(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate for Hugging Face causal LMs: `input_ids`, `attention_mask` and `labels` (= input_ids, -100 where
    padded; the model or DictStep(causal_shift=True) shifts them), padded to the micro-batch's longest."""
    input_ids = _padded(samples, 0)
    mask = _padded([torch.ones(len(s), dtype=torch.long) for s in samples], 0)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, IGNORE_INDEX)}


class CollatedData(Dataset):
    """A data set whose `__getitems__` returns one collated batch (None for no indices: an empty cell), so the
    trainer's loader runs `collate` (data.collate) on each micro-batch."""

    def __init__(self, dataset: Dataset, collate: Callable[[list[Any]], Any]) -> None:
        self.dataset, self.collate = dataset, collate
        self.info = getattr(dataset, "info", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> Any:
        return self.collate([self.dataset[i] for i in indices]) if len(indices) else None


# ---- what a model factory is told about the data --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model factory needs to know about the data (None where it does not apply).

    A data set may carry its own as an `info` attribute; otherwise `data_info` reads it from the first sample.
    """

    features: int | None = None
    """Values per input sample (flattened), e.g. 64 for the 8×8 digits."""
    classes: int | None = None
    """Classes of a classification set (largest label + 1)."""
    vocab_size: int | None = None
    """Token ids are in [0, vocab_size) (256 for byte-level text)."""
    seq_len: int | None = None
    """Longest input sequence, in tokens."""
    input_shape: tuple[int, ...] | None = None
    """Shape of one input sample, e.g. (64,)."""


def data_info(train_set: Dataset, *, min_classes: int = 0, default_classes: int | None = None) -> DataInfo:
    """The set's own `info`, or features / classes / input shape read from an (inputs, label) set: classes from
    its `y` labels (at least `min_classes`), else `default_classes`."""
    info = getattr(train_set, "info", None)
    if isinstance(info, DataInfo):
        return info
    first = train_set[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2 or not isinstance(first[0], torch.Tensor):
        return DataInfo(classes=default_classes)
    labels = getattr(train_set, "y", None)
    if isinstance(labels, torch.Tensor) and len(labels):
        classes = max(int(labels.max()) + 1, min_classes)
    else:
        classes = default_classes
    return DataInfo(features=int(first[0].numel()), classes=classes, input_shape=tuple(first[0].shape))
