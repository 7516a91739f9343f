"""A writer SIGKILLed in the middle of a checkpoint leaves the previous one as the checkpoint to resume from.

The writer is a forked child (no second torch import) that dies at a chosen point of `save_checkpoint`:
right after the model file is written, after the manifest, or after the rename but before `latest` moves.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from ddp_toolkit import checkpoint as ckpt
from ddp_toolkit.config import validate
from ddp_toolkit.dist import DistEnv
from ddp_toolkit.trainer import train_from_config
from tests.distributed.harness import final_weights, small_config


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _killing_fsync(name: str):
    """`_fsync_file` that kills the process once the file called `name` has been written and synced."""
    original = ckpt._fsync_file

    def fsync(path: Path) -> None:
        original(path)
        if Path(path).name == name:
            _die()
    return fsync


CRASH_POINTS = {
    "after_model_file": lambda mp: mp.setattr(ckpt, "_fsync_file", _killing_fsync("model.safetensors")),
    "after_manifest": lambda mp: mp.setattr(ckpt, "_fsync_file", _killing_fsync(ckpt.MANIFEST)),
    "before_latest_moves": lambda mp: mp.setattr(ckpt, "_point_latest", lambda root, name: _die()),
}


def _in_killed_child(target) -> int:
    """Run `target` in a forked child; returns its exit code (−SIGKILL when it was killed)."""
    proc = multiprocessing.get_context("fork").Process(target=target)
    proc.start()
    proc.join(120)
    return proc.exitcode


def _save(root: Path, iteration: int, value: float) -> None:
    ckpt.save_checkpoint(root, iteration, model_state={"w": torch.full((3,), value)},
                         state={"iteration": iteration}, rank=0, barrier=lambda: None)


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path, point):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)

    def crash() -> None:
        torch.set_num_threads(1)
        with pytest.MonkeyPatch.context() as mp:
            CRASH_POINTS[point](mp)
            _save(root, 2, 2.0)
        os._exit(0)  # not reached when the crash point is

    assert _in_killed_child(crash) == -signal.SIGKILL
    latest = ckpt.find_latest(root)
    assert latest == root / ckpt.checkpoint_name(1)
    weights, state, _ = ckpt.load_checkpoint(latest, 0)
    assert torch.equal(weights["w"], torch.full((3,), 1.0)) and state["iteration"] == 1
    _save(root, 2, 2.0)  # the next save clears the debris and goes through
    assert ckpt.find_latest(root) == root / ckpt.checkpoint_name(2)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")]


def _train(raw: dict) -> None:
    train_from_config(validate(raw), env=DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                                                 launcher="test"))


def test_resume_after_a_crash_mid_checkpoint_continues_from_the_previous_one(tmp_path):
    def raw(run: str, **train) -> dict:
        return small_config(tmp_path / run, data={"eval_size": 0},
                            train={"iterations": 8, "checkpoint_every": 2, "log_every": 1, **train})

    _train(raw("straight"))

    def crash() -> None:  # dies while writing the checkpoint of iteration 4, after its model file
        torch.set_num_threads(1)
        with pytest.MonkeyPatch.context() as mp:
            original = ckpt._fsync_file

            def fsync(path: Path) -> None:
                original(path)
                if Path(path).name == "model.safetensors" and Path(path).parent.name.endswith("it00000004"):
                    _die()
            mp.setattr(ckpt, "_fsync_file", fsync)
            _train(raw("crashed"))
        os._exit(0)

    assert _in_killed_child(crash) == -signal.SIGKILL
    root = tmp_path / "crashed" / "checkpoints"
    assert ckpt.find_latest(root) == root / ckpt.checkpoint_name(2)
    _train(raw("crashed", resume="auto"))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)
