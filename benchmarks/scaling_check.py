"""Scaling estimate (ddp_toolkit/scaling.py) against measured W = 1 and W = 2 runs on this machine.

1. W = 1: the Trainer in this process (one thread); micro-step time = median compute_seconds / k.
2. W = 2 (spawned, gloo, one thread each): this machine's all-reduce of the gradient bytes and of one float,
   timed directly (the float gives the latency per ring step, the gradient the bandwidth); then the Trainer,
   whose metrics give the gradient bytes per round and the measured iteration time.
3. The estimate for W = 2 — k × micro-step + ring all-reduce(bytes, W = 2) — next to the measured W = 2
   iteration, and the estimate for W = 8 … 1024 with this machine's link figures.
The check covers how compute and communication add up within an iteration; the ring's growth with W cannot be
measured on one host with two cores.

    python benchmarks/scaling_check.py
    python benchmarks/scaling_check.py --quick           # tiny sizes

JSON on stdout, a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from _common import machine, make_data, make_model, parse_in_process, spawn, train_in_process

from ddp_toolkit import scaling
from ddp_toolkit.dist import DistEnv
from ddp_toolkit.trainer import Trainer


def _raw(spec: dict) -> dict:
    return {"batch": {"micro_batch_size": spec["b"], "grad_accum_steps": spec["k"]},
            "train": {"iterations": spec["iterations"], "log_every": 1, "engine": "ddp"},
            "report": {"flops": False}}


def _time_allreduce(numel: int, repeats: int) -> float:
    t = torch.zeros(numel)
    times = []
    for _ in range(repeats + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def worker(rank: int, world_size: int, port: int, device: str, spec: dict) -> dict:
    """W = 2: link figures of this machine, then the Trainer; rank 0's measurements."""
    grad_numel = spec["grad_bytes"] // 4
    small, big = _time_allreduce(1, spec["repeats"]), _time_allreduce(grad_numel, spec["repeats"])
    data = make_data(spec["features"], 10, spec["b"] * spec["k"] * world_size * spec["iterations"])
    from ddp_toolkit.config import Config

    run_dir = Path(spec["tmp"]) / "w2"
    cfg = Config.model_validate({**_raw(spec), "run_dir": str(run_dir), "report": {"console": False, "flops": False}})
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                  launcher="benchmark")
    Trainer(make_model(spec["features"], 10, spec["hidden"]), data, cfg, env=env).fit()
    return {"allreduce_one_float_s": small, "allreduce_grad_s": big, "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = parse_in_process(parser, argv)
    spec = {"features": 512, "hidden": [1024, 1024], "b": 32, "k": 4, "iterations": 20, "repeats": 20}
    if args.quick:
        spec.update(features=16, hidden=[32], b=4, k=2, iterations=4, repeats=3)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ddp_bench_scaling_") as tmp:
        spec["tmp"] = tmp
        data = make_data(spec["features"], 10, spec["b"] * spec["k"] * spec["iterations"])
        rows1, _ = train_in_process(_raw(spec), make_model(spec["features"], 10, spec["hidden"]), data,
                                    Path(tmp) / "w1")
        micro_step = statistics.median(r["compute_seconds"] for r in rows1[1:]) / spec["k"]
        spec["grad_bytes"] = sum(p.numel() * 4 for p in make_model(spec["features"], 10, spec["hidden"]).parameters())
        link = spawn(worker, spec, 2, "cpu")
        measured2 = scaling.from_run(link["run_dir"])
        rows2 = [json.loads(line) for line in (Path(link["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        timed2 = [r for r in rows2[1:] if "iteration_seconds" in r]
        iteration2 = statistics.median(r["iteration_seconds"] for r in timed2)
        split2 = {f"{key}_w2": statistics.median(r[key] for r in timed2)
                  for key in ("data_seconds", "compute_seconds", "optimizer_seconds")}
    latency = link["allreduce_one_float_s"] / 2  # 2(W−1) = 2 ring steps at W = 2
    bandwidth = spec["grad_bytes"] / max(link["allreduce_grad_s"] - link["allreduce_one_float_s"], 1e-9)  # 2(W−1)/W = 1
    predicted2 = scaling.estimate(measured2["grad_bytes"], micro_step, bandwidth, grad_accum_steps=spec["k"],
                                  latency_s=latency, world_sizes=(2,))[0]
    larger = scaling.estimate(measured2["grad_bytes"], micro_step, bandwidth, grad_accum_steps=spec["k"],
                              latency_s=latency)
    document = {
        "benchmark": "scaling_check", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**machine(), "load_average_1min": [load_before, os.getloadavg()[0]]},
        "settings": {k: v for k, v in spec.items() if k != "tmp"},
        "measured": {"micro_step_s_w1": micro_step, "grad_bytes_from_metrics": measured2["grad_bytes"],
                     "latency_per_step_s": latency, "bandwidth_bytes_per_s": bandwidth,
                     "iteration_s_w2": iteration2, **split2, **{k: v for k, v in link.items() if k != "run_dir"}},
        "predicted_w2": predicted2.__dict__, "prediction_over_measured_w2": predicted2.iteration_seconds / iteration2,
        "estimate": [p.__dict__ for p in larger],
    }
    print(json.dumps(document, indent=2))
    print(f"W = 2: predicted {predicted2.iteration_seconds * 1e3:.2f} ms/iteration, measured {iteration2 * 1e3:.2f} "
          f"(ratio {document['prediction_over_measured_w2']:.3f}); link {bandwidth / 1e9:.3g} GB/s, "
          f"{latency * 1e6:.3g} µs per step", file=sys.stderr)
    inputs = {"grad_bytes": measured2["grad_bytes"], "bandwidth": bandwidth, "latency_s": latency,
              "micro_step_seconds": micro_step, "grad_accum_steps": spec["k"], "max_share": scaling.DEFAULT_MAX_SHARE}
    print(scaling.render(larger, inputs), file=sys.stderr)


if __name__ == "__main__":
    main()
