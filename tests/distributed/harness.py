"""Real multi-process runs for the distributed tests: spawned gloo workers and the real launchers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from ddp_toolkit.engines.ddp import DDPEngine
from ddp_toolkit.launcher import free_port as free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "launch" / "train.py"




class SyncEveryMicroStep(DDPEngine):
    """The no-accumulation baseline (tests and benchmarks only): gradients all-reduced after every micro-step."""

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def small_config(run_dir: Path, **sections) -> dict:
    """A float64 config on tiny synthetic data; `sections` update the defaults section by section."""
    cfg = {
        "run_dir": str(run_dir),
        "data": {"name": "synthetic", "size": 64, "eval_size": 33, "features": 8, "classes": 3},
        "model": {"name": "mlp", "hidden": [8], "dtype": "float64"},
        "batch": {"micro_batch_size": 4, "global_batch_size": 16},
        "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9},
        "train": {"iterations": 8, "log_every": 1, "seed": 3},
        "report": {"console": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


def _train_worker(rank: int, world_size: int, port: int, raw: dict, kwargs: dict) -> None:
    from ddp_toolkit.config import validate
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import train_from_config

    torch.set_num_threads(1)
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                  master_port=port, launcher="test")
    train_from_config(validate(raw), env=env, **kwargs)


def spawn_train(raw: dict, world_size: int, **trainer_kwargs) -> Path:
    """Train `raw` with `world_size` spawned gloo processes; returns run_dir."""
    if world_size == 1:
        _train_worker(0, 1, free_port(), raw, trainer_kwargs)
    else:
        mp.spawn(_train_worker, args=(world_size, free_port(), raw, trainer_kwargs), nprocs=world_size,
                 join=True)
    return Path(raw["run_dir"])


# ---- pools: one spawn of workers runs many scenarios, so the processes (and their imports) start once ---------
Scenario = Callable[..., None]
"""`(env) -> None`: one run in a pool worker, e.g. `train_from_config` on a config."""


def config_scenario(raw: dict, **trainer_kwargs) -> Scenario:
    """The scenario that trains `raw` with `train_from_config(..., **trainer_kwargs)`."""
    def run(env) -> None:
        from ddp_toolkit.config import validate
        from ddp_toolkit.trainer import train_from_config

        train_from_config(validate(raw), env=env, **trainer_kwargs)
    return run


@contextlib.contextmanager
def pool_group(rank: int, world_size: int, port: int, timeout_s: float = 120.0) -> Iterator[None]:
    """A gloo process group of the first `world_size` pool workers on loopback, kept across their scenarios (the
    trainer leaves a group it did not make alone) and destroyed on the way out."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def scenario_env(rank: int, world_size: int):
    """The DistEnv of a pool worker taking part in a run of `world_size` ranks (its process group already made)."""
    from ddp_toolkit.dist import DistEnv

    return DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                   launcher="test")


def run_scenario(run_dir: Path, rank: int, run: Scenario, env) -> None:
    """Run one scenario; its traceback, if any, lands in run_dir/error.txt, so that one broken scenario fails
    its own test, not the whole pool."""
    try:
        run(env)
    except BaseException:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "error.txt", "a") as fh:
            fh.write(f"rank {rank}:\n{traceback.format_exc()}\n")


def scenario_dir(root: Path, name: str) -> Path:
    """The run directory of a pool's scenario, after checking that no rank left an error there."""
    error = root / name / "error.txt"
    assert not error.exists(), error.read_text()
    return root / name


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(config: Path, nproc: int, *overrides: str, timeout: int = 300, max_restarts: int = 0,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node N launch/train.py CONFIG overrides` on loopback."""
    cmd = torchrun_command(config, nproc, *overrides, max_restarts=max_restarts)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(env), cwd=REPO)


def worker_env(extra: dict | None = None) -> dict:
    """The environment of launched workers: one thread each, and the repo importable (tests.fixtures)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(extra or {})}


def torchrun_command(config: Path, nproc: int, *overrides: str, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1", f"--max-restarts={max_restarts}",
            str(TRAIN_SCRIPT), str(config), *overrides]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "final" / "model.safetensors")


def checkpoint_weights(run_dir: Path, iteration: int) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "checkpoints" / f"it{iteration:08d}" / "model.safetensors")


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


MEASURED = ("samples_per_second", "tokens_per_second", "flops_per_second", "mfu", "iteration_seconds", "data_seconds",
            "compute_seconds", "optimizer_seconds", "data_wait_fraction", "peak_memory_mib")
"""Metrics columns measured on the clock or the process (two runs never agree on them)."""


def without_measured(rows: list[dict]) -> list[dict]:
    """Every column of the rows but the measured times, throughput and memory: what two equal runs share."""
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


def max_rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)) for k in a)
