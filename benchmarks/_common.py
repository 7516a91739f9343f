"""Shared pieces of the side-by-side benchmarks: device choice, spawning W workers, machine description.

A benchmark spawns its W processes once (torch.multiprocessing, one CPU thread each), every worker runs
all variants in turn inside the same process group, and rank 0 hands its result back as a JSON file.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddp_toolkit.launcher import free_port


def resolve_device(requested: str, world_size: int) -> str:
    """`auto` → `cuda` (nccl) when at least `world_size` GPUs are visible, else `cpu` (gloo)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "cpu"
    if requested == "cuda" and torch.cuda.device_count() < world_size:
        raise SystemExit(f"--device cuda needs {world_size} GPUs, found {torch.cuda.device_count()}")
    return requested


def machine() -> dict:
    """What the figures were measured on: CPU model, cores, torch version and, on GPU, the device name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import accelerate

        out["accelerate"] = accelerate.__version__
    except ImportError:
        out["accelerate"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_count"] = torch.cuda.device_count()
    return out


def _worker(rank: int, world_size: int, port: int, device: str, fn: Callable, spec: dict, out: str) -> None:
    sys.stdout.flush()
    os.dup2(2, 1)  # stdout carries only the parent's JSON document; libraries' chatter goes to stderr
    # the variables torchrun would set: Accelerate's state reads them
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=600))
    try:
        result = fn(rank, world_size, port, device, spec)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, spec: dict, world_size: int, device: str) -> dict:
    """Run `fn(rank, world_size, port, device, spec)` in `world_size` fresh processes; rank 0's return value.

    One thread per process (OMP_NUM_THREADS=1 also stops Accelerate from choosing its own thread count).
    With device `cpu` on a GPU machine the GPUs are hidden from the workers. The variables are set for the
    workers only: this process's environment is restored afterwards.
    """
    changes = {"OMP_NUM_THREADS": "1", **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        with tempfile.TemporaryDirectory(prefix="ddp_bench_") as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(_worker, args=(world_size, free_port(), device, fn, spec, out), nprocs=world_size, join=True)
            return json.loads(Path(out).read_text())
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_data(features: int, classes: int, size: int, dtype: torch.dtype = torch.float32):
    """`size` seeded synthetic samples as the toolkit's TensorData (whole batches by one index operation)."""
    from ddp_toolkit.data import TensorData, synthetic_classification

    train, _ = synthetic_classification(size, 0, features, classes, noise=0.5, seed=0)
    return TensorData(train.x.to(dtype), train.y)


def make_model(features: int, classes: int, hidden: list[int], dtype: torch.dtype = torch.float32):
    """The toolkit's MLP, initialised from seed 0 (so every variant starts from the same weights)."""
    from ddp_toolkit.models import mlp

    torch.manual_seed(0)
    return mlp(features, classes, hidden).to(dtype)


def identity_collate(batch):
    """TensorData.__getitems__ already returns the batch (x, y)."""
    return batch


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def train_in_process(raw: dict, model, data, run_dir: str | Path) -> tuple[list[dict], dict]:
    """One W = 1 Trainer run in this process (no process group); its metrics rows and summary."""
    from ddp_toolkit.config import Config
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import Trainer

    cfg = Config.model_validate({**raw, "run_dir": str(run_dir), "report": {"console": False, "jsonl": True,
                                                                           **raw.get("report", {})}})
    summary = Trainer(model, data, cfg, env=DistEnv()).fit()
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "iteration" in r], summary


def parse_in_process(parser, argv: list[str] | None):
    """--device (cpu hides the GPUs, before the first CUDA call) and --quick for the in-process benchmarks; one
    CPU thread, as the spawned ones use."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu hides the GPUs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)
    return args


def document(name: str, settings: dict, results, load_before: float) -> dict:
    """The JSON document of a benchmark: name, date, machine (with the 1-minute load before / after), results."""
    from datetime import datetime, timezone

    return {"benchmark": name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {**machine(), "load_average_1min": [load_before, os.getloadavg()[0]]},
            "settings": settings, "results": results}


def _train_worker(rank: int, world_size: int, port: int, device: str, spec: dict) -> dict:
    from ddp_toolkit.config import Config
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import Trainer

    cfg = Config.model_validate({**spec["raw"], "run_dir": spec["run_dir"],
                                 "report": {"console": False, "jsonl": True, **spec["raw"].get("report", {})}})
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                  launcher="benchmark")
    data = make_data(spec["features"], spec["classes"], spec["size"])
    Trainer(make_model(spec["features"], spec["classes"], spec["hidden"]), data, cfg, env=env).fit()
    return {}


def train_spawned(raw: dict, model: dict, size: int, run_dir: str | Path, world_size: int,
                  device: str = "cpu") -> list[dict]:
    """The Trainer in `world_size` spawned processes (ddp engine) on make_model(**model) and `size` samples of
    make_data; rank 0's metrics rows."""
    spawn(_train_worker, {"raw": raw, "run_dir": str(run_dir), "size": size, **model}, world_size, device)
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "iteration" in r]
