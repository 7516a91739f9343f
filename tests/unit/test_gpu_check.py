"""CPU checks of the GPU-readiness review (#22) and of benchmarks/gpu_check.py, so that the GPU script cannot rot.

The CUDA paths are reached by monkeypatching torch.cuda (RNG states of this rank's device only) or by a dry run
of the GPU script on CPU (tiny sizes, gloo).
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from ddp_toolkit import checkpoint
from ddp_toolkit.config import Config
from ddp_toolkit.data import TensorData
from ddp_toolkit.dist import DistEnv
from ddp_toolkit.trainer import Trainer

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


class FakeCuda:
    """torch.cuda's RNG functions for `count` visible devices, current device `current`."""

    def __init__(self, monkeypatch, count: int, current: int) -> None:
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.set_calls: list[tuple[int, int]] = []
        for name, fn in {"is_available": lambda: True, "device_count": lambda: count,
                         "current_device": lambda: current, "get_rng_state": lambda d=current: self.states[d],
                         "get_rng_state_all": lambda: [self.states[i] for i in range(count)],
                         "set_rng_state": self._set,
                         "set_rng_state_all": lambda states: [self._set(s, i) for i, s in enumerate(states)]}.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def _set(self, state, device=None):
        if device not in self.states:
            raise IndexError(f"device {device} of {len(self.states)}")
        self.set_calls.append((int(state[0]), device))


def test_rng_state_saves_this_ranks_device_only(monkeypatch):
    FakeCuda(monkeypatch, count=4, current=2)
    state = checkpoint.rng_state()
    assert int(state["cuda_device"][0]) == 2 and "cuda" not in state


def test_rng_resume_with_fewer_visible_gpus(monkeypatch):
    FakeCuda(monkeypatch, count=4, current=3)
    state = checkpoint.rng_state()  # saved on device 3 of 4
    fewer = FakeCuda(monkeypatch, count=1, current=0)  # resumed with CUDA_VISIBLE_DEVICES=3: one device, index 0
    checkpoint.set_rng_state(state)
    assert fewer.set_calls == [(3, 0)]


def test_rng_old_checkpoint_with_every_gpu(monkeypatch):
    old = {**checkpoint.rng_state(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(4)]}
    fewer = FakeCuda(monkeypatch, count=2, current=1)
    checkpoint.set_rng_state(old)  # set_rng_state_all would raise IndexError here
    assert fewer.set_calls == [(1, 1)]
    one = FakeCuda(monkeypatch, count=1, current=0)
    checkpoint.set_rng_state({**old, "cuda": old["cuda"][:0]})  # nothing for this device: skipped, no error
    assert one.set_calls == []


def _trainer(tmp_path, **train) -> Trainer:
    data = TensorData(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    cfg = Config.model_validate({"run_dir": str(tmp_path / "run"), "batch": {"micro_batch_size": 4},
                                 "train": {"iterations": 1, **train}, "report": {"console": False}})
    return Trainer(torch.nn.Linear(4, 3), data, cfg, env=DistEnv())


def test_loader_options(tmp_path):
    trainer = _trainer(tmp_path, num_workers=1, prefetch_factor=3, persistent_workers=True)
    try:
        loader = trainer.loader
        assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (1, 3, True)
        assert loader.pin_memory is False  # default: on CUDA only
    finally:
        trainer.close()


def test_compile_keeps_state_dict_keys(tmp_path):
    trainer = _trainer(tmp_path, compile=True)
    try:
        module = trainer.engine.module
        assert isinstance(module.forward, types.MethodType) and module.forward.__self__ is module
        assert list(module.state_dict()) == ["weight", "bias"]  # no `_orig_mod.`: checkpoints stay compatible
    finally:
        trainer.close()


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    try:
        yield importlib.import_module("gpu_check")
    finally:
        sys.modules.pop("gpu_check", None)
        sys.modules.pop("_common", None)


def test_a_failing_cell_is_recorded(gpu_check, monkeypatch):
    def boom(ctx):
        raise RuntimeError("no NCCL here")

    monkeypatch.setattr(gpu_check, "cell_nccl_init", boom)
    saved = []
    cells = gpu_check.run_cells(object(), ["nccl_init"], saved.append)
    assert cells["nccl_init"]["status"] == "failed" and "no NCCL here" in cells["nccl_init"]["error"]
    assert saved == [cells]
    table = gpu_check.markdown({"date": "d", "machine": {"torch": "t"}, "dry_run": True, "cells": cells})
    assert "| nccl_init | failed |" in table


@pytest.mark.distributed
def test_gpu_check_dry_run(gpu_check, tmp_path, capsys):
    """Two cells end to end on CPU (child process, metrics, JSON, Markdown); the full dry run takes minutes."""
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--cells", "default_config", "syncbn_bf16"]) == 0
    document = json.loads((tmp_path / "gpu_check.json").read_text())
    cells = document["cells"]
    assert cells["default_config"]["status"] == "ok", cells
    assert cells["default_config"]["iterations"] == 3 and cells["default_config"]["final_loss"] > 0
    assert 0 <= cells["default_config"]["data_wait_fraction"] < 1  # the metrics rows carry it
    assert cells["syncbn_bf16"]["status"] == "skipped"
    assert "| default_config | ok |" in (tmp_path / "gpu_check.md").read_text()
