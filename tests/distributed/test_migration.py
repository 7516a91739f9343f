"""Migration check (#20 item 5): examples/plain_ddp.py, a plain DistributedSampler + DDP script run by torchrun,
and the toolkit with data.order=distributed_sampler end with the same float64 weights at W=2, k=2; the default
global order does not (so the check would notice the option doing nothing)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.distributed.harness import (
    REPO,
    final_weights,
    free_port,
    max_rel_error,
    metrics,
    small_config,
    worker_env,
)

pytestmark = pytest.mark.distributed

N, B, b, EPOCHS, SEED, LR = 41, 16, 4, 3, 3, 0.2  # W=2, k=2; 21 samples per rank (one padded): 2 iterations
PLAIN = ["--dataset-size", str(N), "--eval-size", "0", "--features", "8", "--classes", "3", "--hidden", "8",
         "--dtype", "float64", "--micro-batch-size", str(b), "--grad-accum-steps", "2", "--epochs", str(EPOCHS),
         "--seed", str(SEED), "--lr", str(LR), "--momentum", "0.9"]


def start_plain_ddp(out, nproc: int = 2) -> subprocess.Popen:
    """`torchrun --nproc-per-node N examples/plain_ddp.py ...` on loopback, started in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1",
           str(REPO / "examples" / "plain_ddp.py"), *PLAIN, "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env(),
                            cwd=REPO)


def toolkit_config(run_dir, order: str) -> dict:
    raw = small_config(run_dir, data={"size": N, "eval_size": 0, "order": order},
                       batch={"micro_batch_size": b, "global_batch_size": B},
                       optim={"lr": LR, "momentum": 0.9}, train={"epochs": EPOCHS, "seed": SEED})
    del raw["train"]["iterations"]
    return raw


def _train_each(rank: int, world_size: int, ports: list[int], raws: list[dict]) -> None:
    """One spawned worker trains every config in turn (one process start and torch import for all of them)."""
    from ddp_toolkit.config import validate
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import train_from_config

    torch.set_num_threads(1)
    for port, raw in zip(ports, raws, strict=True):
        env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                      master_port=port, launcher="test")
        train_from_config(validate(raw), env=env)


def test_distributed_sampler_order_matches_a_plain_ddp_script(tmp_path):
    plain = start_plain_ddp(tmp_path / "plain.safetensors")  # runs while the toolkit trains
    try:
        raws = [toolkit_config(tmp_path / order, order) for order in ("distributed_sampler", "global")]
        mp.spawn(_train_each, args=(2, [free_port(), free_port()], raws), nprocs=2, join=True)
        output, _ = plain.communicate(timeout=300)
    finally:
        plain.kill()
    assert plain.returncode == 0, output[-3000:]
    expected = load_file(tmp_path / "plain.safetensors")
    got = final_weights(tmp_path / "distributed_sampler")
    assert max_rel_error(got, expected) <= 1e-12  # bit-identical on torch 2.13 CPU
    rows = metrics(tmp_path / "distributed_sampler")  # the plan counts what the order trains on: 2 iterations/epoch
    assert [r["samples_seen"] for r in rows] == [B * (i + 1) for i in range(2 * EPOCHS)]
    assert max_rel_error(final_weights(tmp_path / "global"), expected) > 1e-3  # the default order: another trajectory
