"""Communication per iteration: gradient all-reduce calls and bytes for k = 1, 2, 4, 8 accumulation steps.

For each k, with the same model, micro-batch b and W processes:
  trainer       ddp_toolkit's Trainer (ddp engine); figures read from its own metrics
                (allreduces_per_iteration, allreduce_rounds_per_iteration, allreduce_bytes_per_iteration);
  hand no_sync  a hand DDP loop with `no_sync()` on the first k−1 micro-steps;
  hand naive    the same loop without no_sync (DDP syncs after every micro-step).
Both hand loops count with their own DDP comm hook (calls, bytes, bucket-0 calls = rounds) around torch's
default all-reduce. A call is one DDP bucket; a round is one synchronised backward.
Not counted here: the trainer's one all-reduce of 2 float64 (loss sum and stop vote) per logged iteration.

    python benchmarks/comm.py                        # k = 1 2 4 8, MLP 512-2048-2048-10, b = 4, W = 2
    python benchmarks/comm.py --grad-accum-steps 1 16 --hidden 1024
    python benchmarks/comm.py --quick                # smoke test

JSON on stdout, a table on stderr; `--device auto` runs nccl on CUDA when W GPUs are visible.
"""

# no `from __future__ import annotations`: DDP checks the comm hook's annotations at run time

import argparse
import contextlib
import json
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import identity_collate, machine, make_data, make_model, resolve_device, spawn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ddp_toolkit.config import Config
from ddp_toolkit.dist import DistEnv
from ddp_toolkit.trainer import Trainer

KEYS = ("allreduces_per_iteration", "allreduce_rounds_per_iteration", "allreduce_bytes_per_iteration")


class Counter:
    """State of the counting hook: all-reduce calls, rounds (bucket 0) and bytes so far."""

    def __init__(self) -> None:
        self.calls = self.rounds = self.bytes = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.calls, self.rounds, self.bytes


def counting_hook(state: Counter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.calls += 1
    state.rounds += bucket.index() == 0
    state.bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def hand_loop(spec: dict, k: int, device: torch.device, no_sync: bool) -> list[dict]:
    """A hand DDP loop of spec['iterations'] iterations; the counter's increments per iteration."""
    rank, world, b = dist.get_rank(), dist.get_world_size(), spec["micro_batch_size"]
    data = make_data(spec["features"], spec["classes"], b * k * world * spec["iterations"])
    model = DistributedDataParallel(make_model(spec["features"], spec["classes"], spec["hidden"]).to(device),
                                    device_ids=[device.index] if device.type == "cuda" else None)
    counter = Counter()
    model.register_comm_hook(counter, counting_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=b, sampler=sampler, drop_last=True, collate_fn=identity_collate)
    rows, before = [], counter.snapshot()
    for micro_step, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        sync = (micro_step + 1) % k == 0
        with contextlib.nullcontext() if sync or not no_sync else model.no_sync():
            (F.cross_entropy(model(x), y) / k).backward()
        if sync:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            after = counter.snapshot()
            rows.append(dict(zip(KEYS, (a - b for a, b in zip(after, before, strict=True)), strict=True)))
            before = after
    return rows


def trainer_rows(spec: dict, k: int, device: torch.device, run_dir: Path) -> list[dict]:
    """The Trainer's own metrics rows (log_every=1; rank 0 reads metrics.jsonl)."""
    rank, world, b = dist.get_rank(), dist.get_world_size(), spec["micro_batch_size"]
    data = make_data(spec["features"], spec["classes"], b * k * world * spec["iterations"])
    cfg = Config.model_validate({
        "run_dir": str(run_dir),
        "batch": {"micro_batch_size": b, "grad_accum_steps": k, "drop_last": True},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"iterations": spec["iterations"], "engine": "ddp", "seed": 0, "log_every": 1},
        "report": {"console": False, "jsonl": True},
    })
    env = DistEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world, launcher="benchmark")
    Trainer(make_model(spec["features"], spec["classes"], spec["hidden"]), data, cfg, env=env).fit()
    if rank != 0:
        return []
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: row[key] for key in KEYS} for row in rows if row.get("kind") == "train"]


def _steady(rows: list[dict], k: int) -> dict:
    """The last iteration's figures, and whether every iteration after the first had the same ones
    (DDP may rebuild its buckets after the first iteration)."""
    last = rows[-1]
    return {**last, "constant_after_first_iteration": all(row == last for row in rows[1:]),
            "per_micro_step": {key: last[key] / k for key in KEYS}}


def comm_worker(rank: int, world_size: int, port: int, device_kind: str, spec: dict) -> dict:
    warnings.filterwarnings("ignore")
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    out = []
    for k in spec["grad_accum_steps"]:
        row = {"grad_accum_steps": k,
               "trainer": trainer_rows(spec, k, device, Path(spec["tmp"]) / f"k{k}"),
               "hand_no_sync": hand_loop(spec, k, device, no_sync=True),
               "hand_naive": hand_loop(spec, k, device, no_sync=False)}
        out.append({"grad_accum_steps": k, **{name: _steady(rows, k) for name, rows in row.items()
                                               if name != "grad_accum_steps" and rows}})
        if rank == 0:
            print(f"k={k} done", file=sys.stderr, flush=True)
    return {"rows": out}


def _checks(rows: list[dict]) -> dict:
    def values(name: str, key: str) -> set:
        return {row[name][key] for row in rows}

    return {
        "trainer_calls_independent_of_k": len(values("trainer", "allreduces_per_iteration")) == 1,
        "trainer_bytes_independent_of_k": len(values("trainer", "allreduce_bytes_per_iteration")) == 1,
        "trainer_one_round_per_iteration": values("trainer", "allreduce_rounds_per_iteration") == {1},
        "trainer_equals_hand_no_sync": all(
            all(row["trainer"][key] == row["hand_no_sync"][key] for key in KEYS) for row in rows),
        "hand_naive_is_k_times": all(
            row["hand_naive"]["allreduces_per_iteration"] == row["grad_accum_steps"]
            * row["hand_no_sync"]["allreduces_per_iteration"] for row in rows),
    }


def _table(document: dict) -> str:
    lines = [f"{'k':>3}  {'variant':<14}{'all-reduces/it':>15}{'rounds/it':>11}{'MB/it':>10}{'constant':>10}",
             "-" * 63]
    for row in document["results"]:
        for name in ("trainer", "hand_no_sync", "hand_naive"):
            r = row[name]
            lines.append(f"{row['grad_accum_steps']:>3}  {name:<14}{r['allreduces_per_iteration']:>15}"
                         f"{r['allreduce_rounds_per_iteration']:>11}{r['allreduce_bytes_per_iteration'] / 1e6:>10.2f}"
                         f"{'yes' if r['constant_after_first_iteration'] else 'no':>10}")
    lines.append("checks: " + ", ".join(f"{key} {'ok' if ok else 'FAIL'}" for key, ok in document["checks"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad-accum-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 2048])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3, help="iterations per run (≥ 2)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="k = 1 and 4, a small MLP, 2 iterations")
    args = parser.parse_args(argv)
    if args.quick:
        args.grad_accum_steps, args.features, args.hidden, args.iterations = [1, 4], 32, [64, 64], 2
    device = resolve_device(args.device, args.world_size)
    spec = {"grad_accum_steps": args.grad_accum_steps, "features": args.features, "hidden": args.hidden,
            "classes": args.classes, "micro_batch_size": args.micro_batch_size,
            "iterations": max(2, args.iterations)}
    with tempfile.TemporaryDirectory(prefix="ddp_bench_comm_") as tmp:
        rows = spawn(comm_worker, {**spec, "tmp": tmp}, args.world_size, device)["rows"]
    parameters = sum(p.numel() for p in make_model(args.features, args.classes, args.hidden).parameters())
    document = {
        "benchmark": "comm",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {**spec, "world_size": args.world_size, "device": device,
                     "backend": "nccl" if device == "cuda" else "gloo", "parameters": parameters,
                     "gradient_bytes": parameters * 4},
        "results": rows,
        "checks": _checks(rows),
    }
    print(json.dumps(document, indent=2))
    print(_table(document), file=sys.stderr)


if __name__ == "__main__":
    main()
