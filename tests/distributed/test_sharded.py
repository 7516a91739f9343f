"""Sharded engines (FSDP2, ZeRO-3) against DDP on real gloo processes, and sharded checkpoints that reshard.

N = 195, B = 16: iteration 13 is a short batch of 3 samples over the W·k = 4 cells (b = 4, k = 2 at W = 2), so
one cell is empty. float32 runs: the sums over ranks happen in another order, so ≤ 1e-6 relative, while a wrong
weighting (×k, ×W) is > 1e-2.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_toolkit.checkpoint import find_latest
from ddp_toolkit.cli import main
from tests.distributed.harness import final_weights, max_rel_error, metrics, small_config, spawn_train

pytestmark = pytest.mark.distributed
TOLERANCE = 1e-6


def _raw(run_dir: Path, engine: str, **train) -> dict:
    return small_config(run_dir, data={"size": 195, "eval_size": 33}, model={"dtype": "float32", "hidden": [16]},
                        batch={"micro_batch_size": 4, "global_batch_size": 16},
                        optim={"name": "adam", "lr": 0.01, "grad_clip": 0.5},
                        train={"iterations": 20, "log_every": 1, "engine": engine, "dist_timeout_s": 120,
                               "fsdp": {"shard_modules": ["Linear"]}, **train},
                        report={"console": False, "flops": False})


def test_fsdp_matches_ddp_resumes_at_another_world_size_and_exports(tmp_path):
    reference = final_weights(spawn_train(_raw(tmp_path / "ddp1", "ddp"), 1))  # W = 1, k = 4
    ddp2 = spawn_train(_raw(tmp_path / "ddp2", "ddp"), 2)
    fsdp = spawn_train(_raw(tmp_path / "fsdp", "fsdp", checkpoint_every=6), 2)
    assert max_rel_error(final_weights(ddp2), reference) <= TOLERANCE
    assert max_rel_error(final_weights(fsdp), reference) <= TOLERANCE
    rows = metrics(fsdp)
    assert rows[12]["batch_samples"] == 3 and rows[-1]["batch_samples"] == 16  # the short batch (an empty cell)
    for row, ref in zip(rows, metrics(ddp2), strict=True):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)  # the global norm of the shards
        assert row["allreduce_rounds_per_iteration"] == 1  # k = 2 micro-steps, one reduction
        assert row["allreduces_per_iteration"] == 2  # one reduce-scatter per FSDP group (two Linear layers)
        assert row["allgathers_per_iteration"] >= 2 and row["allgather_bytes_per_iteration"] > 0  # reported too

    # halt at 6 with W = 2, resume at W = 1; and the reverse: the shards are resharded
    for first, second, name in ((2, 1, "down"), (1, 2, "up")):
        spawn_train(_raw(tmp_path / name, "fsdp", halt_at=6), first)
        assert (tmp_path / name / "checkpoints" / "it00000006" / ".metadata").is_file()
        spawn_train(_raw(tmp_path / name, "fsdp", resume="auto"), second)
        assert max_rel_error(final_weights(tmp_path / name), reference) <= TOLERANCE, name

    # one safetensors file from the sharded checkpoint, loadable into the plain model
    assert main(["export", str(fsdp), "--out", str(tmp_path / "model.safetensors")]) == 0
    exported = load_file(tmp_path / "model.safetensors")
    assert max_rel_error(exported, final_weights(fsdp)) == 0
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    plain.load_state_dict(exported)
    from ddp_toolkit.config import validate
    from ddp_toolkit.data import build_data

    _, eval_set = build_data(validate(_raw(tmp_path / "fsdp", "fsdp")).data)
    with torch.no_grad():  # the plain model's eval loss is the run's last one
        loss = float(torch.nn.functional.cross_entropy(plain(eval_set.x), eval_set.y, reduction="sum")) / len(eval_set)
    assert loss == pytest.approx(metrics(fsdp, "eval")[-1]["eval_loss"], rel=1e-5)

    # a torn shard in the newest checkpoint: skipped with a warning naming it, the previous one is used
    shard = fsdp / "checkpoints" / "it00000020" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-7])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_latest(fsdp / "checkpoints") == fsdp / "checkpoints" / "it00000018"
    assert any("it00000020" in str(w.message) and "__1_0.distcp" in str(w.message) for w in caught)
    shutil.rmtree(tmp_path / "ddp2")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed")
def test_zero3_matches_ddp_and_resumes_at_another_world_size(tmp_path):
    raw = _raw(tmp_path / "ddp", "ddp")
    raw["optim"] = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "grad_clip": 0.5}
    reference = final_weights(spawn_train(raw, 2))
    z3 = {**raw, "run_dir": str(tmp_path / "z3"), "train": {**raw["train"], "engine": "deepspeed", "zero_stage": 3}}
    spawn_train({**z3, "train": {**z3["train"], "halt_at": 6}}, 2)
    spawn_train({**z3, "train": {**z3["train"], "resume": "auto"}}, 1)  # the gathered state fits any W
    assert max_rel_error(final_weights(tmp_path / "z3"), reference) <= TOLERANCE  # 1.9e-7 measured (fp32)
    rows = metrics(tmp_path / "z3")
    assert {r["allreduce_rounds_per_iteration"] for r in rows if r["world_size"] == 2} == {2}  # per micro-step


def test_the_example_language_model_under_fsdp_matches_ddp(tmp_path: Path) -> None:
    """configs/examples/char_lm.yaml (a byte-level transformer, AdamW, token loss, padded batches) at W = 2."""
    import yaml

    from tests.distributed.harness import REPO

    base = yaml.safe_load((REPO / "configs" / "examples" / "char_lm.yaml").read_text())
    runs = {}
    for engine in ("ddp", "fsdp"):
        raw = {**base, "run_dir": str(tmp_path / engine), "report": {"console": False},
               "data": {**base["data"], "eval_size": 16},
               "train": {**base["train"], "engine": engine, "iterations": 4, "log_every": 1, "epochs": None,
                         "samples": None, "eval_every": None, "checkpoint_every": None}}
        runs[engine] = spawn_train(raw, 2)
    assert max_rel_error(final_weights(runs["fsdp"]), final_weights(runs["ddp"])) <= TOLERANCE
    assert [r["loss"] for r in metrics(runs["fsdp"])] == pytest.approx([r["loss"] for r in metrics(runs["ddp"])],
                                                                     rel=1e-6)
