"""From a config to the parts of a real workload: the data sets (batched by `data.collate`), the model (told what the
data holds), and the step that turns a batch into per-item losses (`train.loss`).

    w = build_workload(load_config("configs/examples/char_lm.yaml"))
    Trainer(w.model, w.train_set, cfg, step=w.step, eval_set=w.eval_set).fit()

One sample batch goes through the step before any process group exists, so a collate returning the wrong type,
targets that do not fit the model's outputs, or a loss that comes back already reduced is one ConfigError line
on every rank, not a traceback inside the first iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ddp_toolkit.config import Config, ConfigError
from ddp_toolkit.data import CollatedData, DataInfo, TensorData, build_data, data_info, load_factory
from ddp_toolkit.errors import InputError
from ddp_toolkit.models import build_model
from ddp_toolkit.step import DictStep, Step, TupleStep, cross_entropy, mse, token_cross_entropy

__all__ = ["Workload", "build_step", "build_workload"]


@dataclasses.dataclass
class Workload:
    """What a config trains: `train_set` / `eval_set` already batch through `collate` (when data.collate is set)."""

    train_set: Dataset
    eval_set: Dataset | None
    model: nn.Module
    step: Step
    collate: Callable[[list[Any]], Any] | None
    info: DataInfo


def build_workload(cfg: Config) -> Workload:
    """Data, model (seeded by train.seed) and step of a config; every bad factory or shape is one ConfigError."""
    d = cfg.data
    try:
        train_set, eval_set = build_data(d)
        collate = load_factory(d.collate, "data.collate") if d.collate else None
        info = data_info(train_set, min_classes=d.classes if d.name == "synthetic" else 0, default_classes=d.classes)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, info)
    except ValueError as err:  # a bad module:function, a model that cannot be built for this data
        raise ConfigError(str(err)) from None
    if cfg.model.dtype == "float64":
        train_set = _cast(train_set, torch.float64)
        eval_set = _cast(eval_set, torch.float64) if eval_set is not None else None
    if collate is not None:
        train_set = CollatedData(train_set, collate)
        eval_set = CollatedData(eval_set, collate) if eval_set is not None else None
    sample = _sample_batch(cfg, train_set)
    try:
        step = build_step(cfg, info, dict_batches=isinstance(sample, dict))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_step(cfg, model, step, sample)
    return Workload(train_set, eval_set, model, step, collate, info)


def build_step(cfg: Config, info: DataInfo | None = None, *, dict_batches: bool = False) -> Step:
    """The step of `train.loss`: `DictStep` for dict batches, else `TupleStep`; loss=custom asks the factory."""
    t = cfg.train
    if t.loss == "custom":
        made = load_factory(t.loss_factory, "train.loss_factory")(info)
        if hasattr(made, "count") and hasattr(made, "forward"):
            return made  # a Step
        if not callable(made):
            raise ValueError(f"train.loss_factory {t.loss_factory} returned a {type(made).__name__}: return a "
                             f"per-item loss function (outputs, targets) -> losses, or a Step")
        return TupleStep(made, ignore_index=t.ignore_index)
    if dict_batches:
        if t.loss == "mse":
            raise ValueError("train.loss=mse takes (inputs, targets) batches; dict batches are scored by "
                             "cross_entropy or token_cross_entropy")
        return DictStep(causal_shift=t.causal_shift, ignore_index=t.ignore_index)
    if t.causal_shift:
        raise ValueError("train.causal_shift applies to dict batches (input_ids, labels); these are "
                         "(inputs, targets): shift the targets in the data or data.collate")
    if t.loss == "token_cross_entropy":
        return TupleStep(token_cross_entropy(t.ignore_index), ignore_index=t.ignore_index)
    return TupleStep(cross_entropy if t.loss == "cross_entropy" else mse, per_sample=True)


def _sample_batch(cfg: Config, train_set: Dataset) -> Any:
    """A batch of (up to) two samples as the loader makes it (through data.collate when set); two, so that a
    loss reduced to a scalar shows."""
    if len(train_set) == 0:
        raise ConfigError("the training set is empty")
    indices = list(range(min(2, len(train_set))))
    if hasattr(train_set, "__getitems__"):
        batch = train_set.__getitems__(indices)
    else:
        from torch.utils.data import default_collate

        batch = default_collate([train_set[i] for i in indices])
    custom = cfg.train.loss == "custom"
    if not custom and not isinstance(batch, dict) and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        where = f"data.collate {cfg.data.collate}" if cfg.data.collate else "the data set"
        raise ConfigError(f"{where} returned a {type(batch).__name__} batch: return (inputs, targets) or a dict "
                          f"with a labels tensor (or set train.loss=custom with a Step)")
    return batch


def check_step(cfg: Config, model: nn.Module, step: Step, batch: Any) -> None:
    """Run one sample batch through the step (no gradient, eval mode): shapes, per-item losses, the count."""
    where = f"data.collate {cfg.data.collate}" if cfg.data.collate else "the data set"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            step.count(batch)
            step.forward(model, batch)
    except InputError as err:
        raise ConfigError(f"{where} with train.loss={cfg.train.loss}: {err}") from None
    finally:
        model.train(was_training)


def _cast(data, dtype):
    """Float features in the model's dtype (built-in TensorData only)."""
    return TensorData(data.x.to(dtype), data.y) if isinstance(data, TensorData) else data
