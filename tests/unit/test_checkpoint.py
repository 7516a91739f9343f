"""Checkpoints: atomic layout, damaged files detected, crafted pickles refused, RNG states round-trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ddp_toolkit import checkpoint as ckpt


def _save(root, iteration, value=1.0):
    return ckpt.save_checkpoint(root, iteration, model_state={"w": torch.full((3,), value)},
                                state={"progress": {"iteration": iteration}}, rank=0, barrier=lambda: None, keep=3)


def test_save_load_round_trip_and_latest_pointer(tmp_path):
    _save(tmp_path, 5, 1.0)
    path = _save(tmp_path, 10, 2.0)
    assert (tmp_path / "latest").read_text().strip() == "it00000010"
    assert not list(tmp_path.glob(".tmp-*"))
    weights, state, rng = ckpt.load_checkpoint(path, rank=0)
    assert torch.equal(weights["w"], torch.full((3,), 2.0)) and state["progress"]["iteration"] == 10
    assert rng is not None and ckpt.load_checkpoint(path, rank=1)[2] is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "rng-rank0.pt"}


def test_keep_prunes_old_checkpoints(tmp_path):
    for it in (1, 2, 3, 4):
        _save(tmp_path, it)
    assert sorted(p.name for p in tmp_path.glob("it*")) == ["it00000002", "it00000003", "it00000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_newest_checkpoint_falls_back_with_warning(tmp_path, damage):
    _save(tmp_path, 5)
    newest = _save(tmp_path, 10)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (newest / "manifest.json").unlink()  # a crash before the manifest: never renamed in practice
    with pytest.warns(UserWarning, match="skipping damaged checkpoint it00000010"):
        assert ckpt.find_latest(tmp_path).name == "it00000005"
    with pytest.raises(ckpt.CheckpointError, match="it00000010"):
        ckpt.load_checkpoint(newest, rank=0)


def test_unfinished_temporary_checkpoint_is_ignored(tmp_path):
    _save(tmp_path, 5)
    (tmp_path / ".tmp-it00000010").mkdir()
    assert ckpt.find_latest(tmp_path).name == "it00000005"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    path = _save(tmp_path, 5)
    marker = tmp_path / "pwned"
    torch.save({"progress": _Evil(marker)}, path / "state.pt")
    ckpt._write_manifest(path, 5)  # the attacker also fixes the manifest: the loader must still refuse
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        ckpt.load_checkpoint(path, rank=0)
    assert not marker.exists()


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
