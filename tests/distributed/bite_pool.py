"""One set of spawned gloo workers that runs every scenario of test_bite.py, so the processes start once.

Each scenario is a function `(env, run_dir) -> None` that trains with `Trainer` or `train_from_config`; the
tests then check its run directory against values computed by hand. A scenario runs on `world_size` of the
pool's ranks (see `_worker`); its traceback, if any, lands in `run_dir/error.txt` so that one broken scenario
fails its own test, not the whole pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import get_worker_info

from ddp_toolkit.data import TensorData
from tests.distributed.harness import (
    Scenario,
    config_scenario,
    free_port,
    pool_group,
    run_scenario,
    scenario_env,
    small_config,
)

POOL_SIZE = 3
PAD = -100  # ignore_index of the per-token loss


# ---- data and models the scenarios share with the tests' hand-computed references ---------------------------
def token_data(n: int, length: int = 5, features: int = 4, classes: int = 3, seed: int = 11) -> TensorData:
    """Sequences of `length` tokens, each sample padded (target PAD) after a random number of real tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n, length), generator=gen)
    real = torch.randint(1, length + 1, (n,), generator=gen)
    y[torch.arange(length)[None, :] >= real[:, None]] = PAD
    return TensorData(x, y)


def token_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).double()


def token_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy; padding contributes 0 (and is not counted: see `count_tokens`)."""
    flat = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=PAD,
                           reduction="none")
    return flat.reshape(targets.shape)


def count_tokens(batch) -> int:
    return int((batch[1] != PAD).sum())


def dropout_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()


class WorkerTracedData(TensorData):
    """TensorData that leaves a file per DataLoader worker process that fetched a batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, trace_dir: Path) -> None:
        super().__init__(x, y)
        self.trace_dir = trace_dir

    def __getitems__(self, indices: list[int]):
        info = get_worker_info()
        if info is not None:
            (self.trace_dir / f"pid{os.getpid()}-worker{info.id}").touch()
        return super().__getitems__(indices)


def synthetic64(raw: dict) -> TensorData:
    from ddp_toolkit.config import validate
    from ddp_toolkit.data import build_data

    train_set, _ = build_data(validate(raw).data)
    return TensorData(train_set.x.double(), train_set.y)


# ---- configs ---------------------------------------------------------------------------------------------------
def lr_configs(run_dir: Path) -> dict[str, dict]:
    """Scenario name → config of the lr-column scenarios (W = 1, B = 16)."""
    base = dict(data={"size": 64, "eval_size": 0}, train={"iterations": 10, "log_every": 1})

    def cfg(name: str, optim: dict) -> dict:
        return small_config(run_dir / name, **base, optim=optim)

    return {
        "lr_none": cfg("lr_none", {"lr": 0.2, "base_batch_size": 4, "lr_scaling": "none"}),
        "lr_linear": cfg("lr_linear", {"lr": 0.2, "base_batch_size": 4, "lr_scaling": "linear"}),
        "lr_sqrt": cfg("lr_sqrt", {"lr": 0.2, "base_batch_size": 4, "lr_scaling": "sqrt"}),
        "lr_adam_sqrt": cfg("lr_adam_sqrt", {"name": "adam", "lr": 0.01, "base_batch_size": 8,
                                              "lr_scaling": "adam_sqrt", "betas": [0.9, 0.999], "eps": 1e-8}),
        "lr_cosine": cfg("lr_cosine", {"lr": 0.2, "base_batch_size": 8, "lr_scaling": "linear", "warmup": 3,
                                        "warmup_start_factor": 0.25, "schedule": "cosine", "min_lr": 0.02}),
        "lr_step": cfg("lr_step", {"lr": 0.2, "base_batch_size": 4, "lr_scaling": "sqrt", "warmup": 2,
                                    "warmup_start_factor": 0.1, "schedule": "step", "step_milestones": [5, 8],
                                    "step_gamma": 0.5, "min_lr": 0.15}),
    }


def exact_config(run_dir: Path, n: int, b: int, B: int, **optim) -> dict:
    """Plain SGD (no momentum), two iterations (a full batch, then a short one), a checkpoint after each."""
    return small_config(run_dir, data={"size": n, "eval_size": 0},
                        batch={"micro_batch_size": b, "global_batch_size": B},
                        optim={"momentum": 0.0, "lr": 0.5, **optim},
                        train={"iterations": 2, "checkpoint_every": 1, "log_every": 1, "dist_timeout_s": 120.0})


def workers_config(run_dir: Path) -> dict:
    """`exact_config` with two DataLoader worker processes per rank."""
    raw = exact_config(run_dir, n=19, b=4, B=16)
    raw["train"]["num_workers"] = 2
    return raw


def resume_config(run_dir: Path, **train) -> dict:
    """W = 2, k = 2, 4 iterations per epoch, 12 iterations: the dropout model's runs."""
    return small_config(run_dir, data={"size": 64, "eval_size": 0}, optim={"lr": 0.1, "momentum": 0.9},
                        train={"iterations": 12, "log_every": 1, "dist_timeout_s": 120.0, **train})


def noise_config(run_dir: Path, iterations: int) -> dict:
    """W = 2, k = 2 (b = 16, B = 64) on a linear model whose weights an lr of 1e-9 keeps where they started."""
    return small_config(run_dir, data={"size": 4096, "eval_size": 0, "features": 16, "classes": 4, "noise": 0.5},
                        model={"name": "linear", "hidden": [], "dtype": "float64"},
                        batch={"micro_batch_size": 16, "global_batch_size": 64},
                        optim={"name": "sgd", "lr": 1e-9, "momentum": 0.0},
                        train={"iterations": iterations, "log_every": 25, "noise_scale": True, "seed": 0,
                               "dist_timeout_s": 120.0})


# ---- scenarios -------------------------------------------------------------------------------------------------
def _tokens(raw: dict) -> Scenario:
    def run(env) -> None:
        from ddp_toolkit.config import validate
        from ddp_toolkit.trainer import Trainer

        cfg = validate(raw)
        Trainer(token_model(cfg.train.seed), token_data(cfg.data.size), cfg, loss_fn=token_loss,
                count_items=count_tokens, env=env).fit()
    return run


def _workers(raw: dict) -> Scenario:
    def run(env) -> None:
        from ddp_toolkit.config import validate
        from ddp_toolkit.models import build_model
        from ddp_toolkit.trainer import Trainer

        cfg = validate(raw)
        data = synthetic64(raw)
        trace = Path(raw["run_dir"]) / "workers"
        trace.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, 8, 3)
        Trainer(model, WorkerTracedData(data.x, data.y, trace), cfg, env=env).fit()
    return run


def _dropout(raw: dict) -> Scenario:
    def run(env) -> None:
        from ddp_toolkit.config import validate
        from ddp_toolkit.trainer import Trainer

        cfg = validate(raw)
        Trainer(dropout_model(cfg.train.seed), synthetic64(raw), cfg, env=env).fit()
    return run


def scenarios(root: Path) -> list[tuple[str, int, Scenario]]:
    """(run_dir name, world size, what to run), in the order every rank walks through them."""
    out: list[tuple[str, int, Scenario]] = [(name, 1, config_scenario(raw)) for name, raw in lr_configs(root).items()]
    out += [
        ("sync_w3k3", 3, config_scenario(exact_config(root / "sync_w3k3", n=23, b=2, B=18))),
        ("clip", 2, config_scenario(exact_config(root / "clip", n=19, b=4, B=16, grad_clip=0.05))),
        ("tokens", 2, _tokens(exact_config(root / "tokens", n=19, b=4, B=16))),
        ("workers", 2, _workers(workers_config(root / "workers"))),
        ("resume_full", 2, _dropout(resume_config(root / "resume_full"))),
        ("resume_boundary", 2, _dropout(resume_config(root / "resume_boundary", halt_at=4))),
        ("resume_boundary", 2, _dropout(resume_config(root / "resume_boundary", resume="auto"))),
        ("resume_mid", 2, _dropout(resume_config(root / "resume_mid", halt_at=6))),
        ("resume_mid", 2, _dropout(resume_config(root / "resume_mid", resume="auto"))),
        ("noise", 2, config_scenario(noise_config(root / "noise", NOISE_ITERATIONS))),
    ]
    return out


NOISE_ITERATIONS = 300


def _worker(rank: int, root: Path, ports: list[int]) -> None:
    """One process group per world size, made here and kept across that world size's scenarios (the trainer
    leaves a group it did not make alone): W = 3 on all ranks, then W = 2 on ranks 0 and 1 while rank 2 runs
    the W = 1 scenarios, which need no group at all."""
    torch.set_num_threads(1)
    plan = scenarios(root)
    for world_size, port in zip((3, 2), ports, strict=True):
        if rank < world_size:
            with pool_group(rank, world_size, port):
                for name, w, run in plan:
                    if w == world_size:
                        run_scenario(root / name, rank, run, scenario_env(rank, w))
        elif rank == 2:
            for name, w, run in plan:
                if w == 1:
                    run_scenario(root / name, rank, run, scenario_env(0, 1))


def run_pool(root: Path) -> Path:
    """Run every scenario under `root` (one spawn of POOL_SIZE processes); returns root."""
    mp.spawn(_worker, args=(root, [free_port(), free_port()]), nprocs=POOL_SIZE, join=True)
    return root
