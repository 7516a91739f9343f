"""The accelerate and DeepSpeed engines through their real launchers (CPU, gloo): the same run as DDP.

Every run here has W = 2, b = 2, B = 16, so k = 4: one gradient all-reduce round per iteration is a real
claim (three micro-steps without sync). N = 198 makes iteration 13 a short batch of 6 samples over the
W·k = 8 cells, so two cells are empty. Launchers cost ~10-20 s each; five launches in all.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import (
    REPO,
    TRAIN_SCRIPT,
    final_weights,
    free_port,
    max_rel_error,
    metrics,
    small_config,
    torchrun,
    worker_env,
    write_config,
)

pytestmark = pytest.mark.distributed

needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="the accelerate extra is not installed")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="the deepspeed extra is not installed")

SAME = ("iteration", "epoch", "samples_seen", "global_batch_size", "batch_samples", "grad_accum_steps", "lr")
ZERO1, ZERO2 = REPO / "configs" / "deepspeed" / "zero1.json", REPO / "configs" / "deepspeed" / "zero2.json"
# float32 runs: DDP and DeepSpeed both sum the same gradients over 2 ranks and divide by 2; 1e-5 leaves room
# for a different summation order (~1e-7 per step over 16 steps) while a wrong weighting (×k, ×W) is > 1e-1.
FLOAT32_TOLERANCE = 1e-5


def _raw(tmp_path: Path, dtype: str) -> dict:
    return small_config(tmp_path / "unused", data={"size": 198}, model={"dtype": dtype},
                        batch={"micro_batch_size": 2, "global_batch_size": 16},
                        optim={"lr": 0.1, "momentum": 0.9, "warmup": 3, "schedule": "cosine"},
                        train={"iterations": 16, "log_every": 1})


def _run(cmd: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(env), cwd=REPO)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def accelerate_launch(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=true accelerate launch` with our 2-process CPU config and a free port."""
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
                 str(TRAIN_SCRIPT), str(config), *overrides], env={"ACCELERATE_USE_CPU": "true"})


def deepspeed_launch(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The `deepspeed` launcher with 2 local processes (CPU accelerator, gloo)."""
    return _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                 str(free_port()), str(TRAIN_SCRIPT), str(config), *overrides])


def _torchrun_ok(config: Path, *overrides: str) -> None:
    done = torchrun(config, 2, *overrides)
    assert done.returncode == 0, done.stderr[-4000:]


def _plan(run_dir: Path) -> dict:
    return json.loads((run_dir / "plan.json").read_text())


def _assert_same_rows(rows: list[dict], reference: list[dict]) -> None:
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in reference]
    for row, ref in zip(rows, reference, strict=True):
        assert {k: row[k] for k in SAME} == {k: ref[k] for k in SAME}


@needs_accelerate
def test_accelerate_launch_matches_ddp(tmp_path):
    config = write_config(_raw(tmp_path, "float64"), tmp_path / "cfg.yaml")
    _torchrun_ok(config, f"run_dir={tmp_path / 'ddp'}")
    accelerate_launch(config, f"run_dir={tmp_path / 'acc'}")  # train.engine: auto
    assert (_plan(tmp_path / "acc")["engine"], _plan(tmp_path / "acc")["launcher"]) == ("accelerate", "accelerate")
    acc, ddp = metrics(tmp_path / "acc"), metrics(tmp_path / "ddp")
    _assert_same_rows(acc, ddp)
    assert [r["batch_samples"] for r in acc][12] == 6  # the short batch, two empty cells
    for row, ref in zip(acc, ddp, strict=True):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-12)
        assert row["allreduce_rounds_per_iteration"] == 1  # k = 4 micro-steps, one sync
        assert row["allreduces_per_iteration"] == ref["allreduces_per_iteration"] >= 1  # DDP buckets
        assert row["allreduce_bytes_per_iteration"] == ref["allreduce_bytes_per_iteration"]
    assert max_rel_error(final_weights(tmp_path / "acc"), final_weights(tmp_path / "ddp")) <= 1e-5


@needs_deepspeed
def test_deepspeed_matches_ddp_through_torchrun_and_its_launcher(tmp_path):
    config = write_config(_raw(tmp_path, "float32"), tmp_path / "cfg.yaml")
    _torchrun_ok(config, f"run_dir={tmp_path / 'ddp'}")
    ddp, ddp_weights = metrics(tmp_path / "ddp"), final_weights(tmp_path / "ddp")

    # ZeRO-1 under torchrun, the whole run, checkpoints at 8 and 16
    _torchrun_ok(config, f"run_dir={tmp_path / 'z1'}", "train.engine=deepspeed", f"train.deepspeed_config={ZERO1}",
                 "train.checkpoint_every=8")
    assert _plan(tmp_path / "z1")["engine"] == "deepspeed"
    z1 = metrics(tmp_path / "z1")
    _assert_same_rows(z1, ddp)
    for row, ref in zip(z1, ddp, strict=True):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert row["allreduce_rounds_per_iteration"] == 1 and row["allreduces_per_iteration"] >= 1
    assert max_rel_error(final_weights(tmp_path / "z1"), ddp_weights) <= FLOAT32_TOLERANCE

    # the deepspeed launcher (engine auto), ZeRO-2, resuming ZeRO-1's checkpoint of iteration 8: the gathered
    # optimizer state (momentum) is stage- and world-size-independent; ZeRO-2 reduces on every micro-step
    deepspeed_launch(config, f"run_dir={tmp_path / 'z2'}", f"train.deepspeed_config={ZERO2}",
                     f"train.resume={tmp_path / 'z1' / 'checkpoints' / 'it00000008'}")
    assert (_plan(tmp_path / "z2")["engine"], _plan(tmp_path / "z2")["launcher"]) == ("deepspeed", "deepspeed")
    z2 = metrics(tmp_path / "z2")
    _assert_same_rows(z2, ddp[8:])
    assert {r["allreduce_rounds_per_iteration"] for r in z2} == {4}  # measured: one reduce-scatter round per micro-step
    assert max_rel_error(final_weights(tmp_path / "z2"), ddp_weights) <= FLOAT32_TOLERANCE


@needs_deepspeed
def test_mismatched_deepspeed_json_is_one_line_before_any_rendezvous(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    raw = small_config(tmp_path / "run", train={"engine": "deepspeed", "deepspeed_config": str(bad)},
                       batch={"micro_batch_size": 8, "grad_accum_steps": 2, "global_batch_size": None})
    config = write_config(raw, tmp_path / "cfg.yaml")
    # rank 0 of a world of 2 whose rank 1 never comes: the check must not wait for it
    env = worker_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(free_port())})
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), str(config)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "train_batch_size 64 vs plan b=8 × k=2 × W=2 = 32" in lines[0]
    assert lines[0].startswith("error: rank 0: DeepSpeed config")
