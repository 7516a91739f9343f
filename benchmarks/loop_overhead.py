"""Loop overhead: the toolkit's Trainer next to a hand-written DDP loop and an idiomatic Accelerate loop.

The same model, data, micro-batch b, accumulation k and world size W run as
  hand        torch DDP, DistributedSampler + DataLoader, `no_sync()` on the first k−1 micro-steps;
  trainer     ddp_toolkit's Trainer (ddp engine) built through the Python API: console report off,
              metrics.jsonl on (a row every --log-every iterations), no eval, no periodic checkpoints;
  accelerate  Accelerator(gradient_accumulation_steps=k), prepared model, optimizer and DataLoader,
              `with accelerator.accumulate(model)` around every micro-step.
All three take SGD (momentum 0.9) steps on the mean loss of a global batch B = b·k·W, synced once per
iteration. The W processes are spawned once (one CPU thread each); each runs every variant in turn,
round after round (the order rotates each round), so the variants share the machine's state.

Timing. Every variant computes its loss through the same wrapper, which stamps the clock at micro-step 0
of every iteration. A run's time per iteration is (stamp[w + n] − stamp[w]) / n for w warm-up and n
measured iterations: everything an iteration does (data, forward, backward, all-reduce, optimizer step,
the trainer's logging every --log-every iterations) is inside, setup and the trainer's final checkpoint are
not. Reported: the median over rounds of that mean; the ratios trainer/hand and trainer/accelerate of those
medians and, less disturbed by other load on the machine, the median of each round's own ratio; and the
CPU time per iteration (all threads, and the main thread alone) over the same window.

Before timing, a float64 check runs each variant for a few full-batch iterations (N = B, so every
iteration sees the whole set whatever the order) and compares the weights with one-process gradient
descent: the three loops compute the same update.

    python benchmarks/loop_overhead.py                      # both cases, 9 rounds (a few minutes on 2 cores)
    python benchmarks/loop_overhead.py --rounds 9 --cases overhead_bound
    python benchmarks/loop_overhead.py --compute-bound-micro-batch-size 32 --compute-bound-hidden 1024 1024
    python benchmarks/loop_overhead.py --quick              # tiny sizes, one round (smoke test)

JSON on stdout, a table on stderr. `--device auto` (the default) runs nccl on CUDA when W GPUs are
visible, else gloo on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import identity_collate, machine, make_data, make_model, ratio, resolve_device, spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ddp_toolkit.config import Config
from ddp_toolkit.data import TensorData
from ddp_toolkit.dist import DistEnv
from ddp_toolkit.trainer import Trainer

VARIANTS = ("hand", "trainer", "accelerate")
LR, MOMENTUM, SEED = 0.01, 0.9, 0  # SEED: data order of the samplers (data and init use seed 0 too)
CASES = {
    # compute dominates: ~2 GFLOP per micro-step, 21 MB of gradients per iteration
    "compute_bound": {"features": 512, "hidden": [2048, 2048], "classes": 10, "micro_batch_size": 64,
                      "grad_accum_steps": 4, "warmup_iterations": 2, "iterations": 10},
    # communication and Python dominate: 2.8k parameters, 8 samples per micro-step
    "overhead_bound": {"features": 32, "hidden": [64], "classes": 10, "micro_batch_size": 8,
                       "grad_accum_steps": 4, "warmup_iterations": 10, "iterations": 100},
}
QUICK = {
    "compute_bound": {"features": 64, "hidden": [128, 128], "warmup_iterations": 1, "iterations": 4},
    "overhead_bound": {"warmup_iterations": 2, "iterations": 10},
}
TARGETS = {"compute_bound": {"trainer/hand": 1.02, "trainer/accelerate": 1.0},
           "overhead_bound": {"trainer/hand": 1.05, "trainer/accelerate": 1.0}}
VERIFY = {"features": 8, "hidden": [16], "classes": 3, "micro_batch_size": 4, "grad_accum_steps": 3,
          "iterations": 3, "lr": 0.1}


class StampedLoss:
    """Per-sample cross-entropy that stamps the clock at micro-step 0 of every iteration and counts calls.

    On CUDA every stamp also records a CUDA event (no synchronisation); the device is synchronised only at the
    stamps in `edges` (the timing window's ends), so the host clocks there are exact and the loop runs as
    asynchronously as it would untimed. Single iterations are then timed by the events.
    """

    def __init__(self, grad_accum_steps: int, device: torch.device, edges: tuple[int, ...] = ()) -> None:
        self.k, self.cuda, self.edges = grad_accum_steps, device.type == "cuda", set(edges)
        self.calls, self.stamps, self.cpu_stamps, self.thread_stamps, self.rows = 0, [], [], [], set()
        self.events: list = []

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.device.type == "meta":  # the trainer's one-time FLOP count (flops.py) on a meta copy: not a step
            return F.cross_entropy(outputs, targets, reduction="none")
        if self.calls % self.k == 0:
            if self.cuda:
                if len(self.stamps) in self.edges:
                    torch.cuda.synchronize()
                self.events.append(torch.cuda.Event(enable_timing=True))
                self.events[-1].record()
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())
            self.thread_stamps.append(time.thread_time())
        self.calls += 1
        self.rows.add(len(targets))
        return F.cross_entropy(outputs, targets, reduction="none")


def hand_loop(model: nn.Module, data: TensorData, case: dict, epochs: int, loss_fn, device: torch.device,
              **_) -> tuple[nn.Module, int]:
    """The minimal DDP loop: sync only on the k-th micro-step, loss mean / k."""
    rank, world, k = dist.get_rank(), dist.get_world_size(), case["grad_accum_steps"]
    ddp = DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=case.get("lr", LR), momentum=MOMENTUM)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=SEED, drop_last=True)
    loader = DataLoader(data, batch_size=case["micro_batch_size"], sampler=sampler, drop_last=True,
                        collate_fn=identity_collate)
    steps = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for micro_step, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = (micro_step + 1) % k == 0
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss = loss_fn(ddp(x), y).mean() / k
                loss.backward()
            if sync:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
    return ddp.module, steps


def trainer_loop(model: nn.Module, data: TensorData, case: dict, epochs: int, loss_fn, device: torch.device,
                 run_dir: Path, log_every: int, **_) -> tuple[nn.Module, int]:
    """ddp_toolkit's Trainer, ddp engine, through the Python API."""
    rank, world = dist.get_rank(), dist.get_world_size()
    b, k = case["micro_batch_size"], case["grad_accum_steps"]
    iterations = epochs * len(data) // (b * k * world)
    cfg = Config.model_validate({
        "run_dir": str(run_dir),
        "batch": {"micro_batch_size": b, "grad_accum_steps": k, "drop_last": True},
        "optim": {"name": "sgd", "lr": case.get("lr", LR), "momentum": MOMENTUM},
        "train": {"iterations": iterations, "engine": "ddp", "seed": SEED, "log_every": log_every},
        "report": {"console": False, "jsonl": True},
    })
    env = DistEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world, launcher="benchmark")
    trainer = Trainer(model, data, cfg, loss_fn=loss_fn, env=env)
    trainer.fit()
    return trainer.engine.module, trainer.progress.iteration


def accelerate_loop(model: nn.Module, data: TensorData, case: dict, epochs: int, loss_fn, device: torch.device,
                    **_) -> tuple[nn.Module, int]:
    """The idiomatic Accelerate loop: prepared model, optimizer and DataLoader, `accumulate()` per micro-step."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=case["grad_accum_steps"], cpu=device.type == "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=case.get("lr", LR), momentum=MOMENTUM)
    loader = DataLoader(data, batch_size=case["micro_batch_size"], shuffle=True, drop_last=True,
                        collate_fn=identity_collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps = 0
    for _epoch in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model(x), y).mean()
                accelerator.backward(loss)  # divides by k
                optimizer.step()  # a no-op until the k-th micro-step
                optimizer.zero_grad()
            steps += accelerator.sync_gradients
    module = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return module, steps


RUNNERS = {"hand": hand_loop, "trainer": trainer_loop, "accelerate": accelerate_loop}


def _data(case: dict, size: int, dtype: torch.dtype = torch.float32) -> TensorData:
    return make_data(case["features"], case["classes"], size, dtype)


def _model(case: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    return make_model(case["features"], case["classes"], case["hidden"], dtype)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def verify(device: torch.device, run_dir: Path) -> dict:
    """Float64 full-batch runs of every variant against one-process gradient descent (max relative error)."""
    case, world = VERIFY, dist.get_world_size()
    global_batch = case["micro_batch_size"] * case["grad_accum_steps"] * world
    data = _data(case, global_batch, torch.float64)
    reference = _model(case, torch.float64)
    optimizer = torch.optim.SGD(reference.parameters(), lr=case["lr"], momentum=MOMENTUM)
    for _ in range(case["iterations"]):
        F.cross_entropy(reference(data.x), data.y).backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = _flat(reference)
    out = {}
    for name in VARIANTS:
        loss = StampedLoss(case["grad_accum_steps"], device)
        module, steps = RUNNERS[name](_model(case, torch.float64), data, case, case["iterations"], loss, device,
                                      run_dir=run_dir / f"verify-{name}", log_every=1)
        got = _flat(module)
        error = torch.tensor([float((got - expected).abs().max() / expected.abs().max())], device=device)
        dist.all_reduce(error, op=dist.ReduceOp.MAX)  # every rank must hold the same weights
        out[name] = {"max_rel_error": float(error), "steps": steps,
                     "ok": float(error) < 1e-10 and steps == case["iterations"]}
    return out


def _time_run(name: str, case: dict, data: TensorData, device: torch.device, run_dir: Path,
              log_every: int) -> dict:
    k, w, n = case["grad_accum_steps"], case["warmup_iterations"], case["iterations"]
    loss = StampedLoss(k, device, edges=(w, w + n))
    gc.collect()
    _, steps = RUNNERS[name](_model(case), data, case, 1, loss, device, run_dir=run_dir, log_every=log_every)
    stamps, total = loss.stamps, w + n + 1
    ok = steps == total and loss.calls == total * k and loss.rows == {case["micro_batch_size"]}
    if loss.cuda:  # single iterations from the events (ms); the window's mean from the synchronised edges
        torch.cuda.synchronize()
        window = loss.events[w:w + n + 1]
        per_iteration = [a.elapsed_time(b) / 1e3 for a, b in zip(window, window[1:], strict=False)]
    else:
        per_iteration = [t1 - t0 for t0, t1 in zip(stamps[w:w + n], stamps[w + 1:w + n + 1], strict=True)]
    return {"mean": (stamps[w + n] - stamps[w]) / n, "median_iteration": statistics.median(per_iteration),
            "cpu": (loss.cpu_stamps[w + n] - loss.cpu_stamps[w]) / n,
            "main_thread_cpu": (loss.thread_stamps[w + n] - loss.thread_stamps[w]) / n, "ok": ok}


def bench_worker(rank: int, world_size: int, port: int, device_kind: str, spec: dict) -> dict:
    """Runs in every process: verification, then each case's rounds of hand / trainer / accelerate."""
    warnings.filterwarnings("ignore")
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    root = Path(spec["tmp"])
    result = {"verification": verify(device, root)}
    for case_name, case in spec["cases"].items():
        global_batch = case["micro_batch_size"] * case["grad_accum_steps"] * world_size
        data = _data(case, global_batch * (case["warmup_iterations"] + case["iterations"] + 1))
        runs = {name: [] for name in VARIANTS}
        for r in range(spec["warmup_rounds"] + spec["rounds"]):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for name in order:
                timing = _time_run(name, case, data, device, root / f"{case_name}-{r}-{name}", spec["log_every"])
                if r >= spec["warmup_rounds"]:
                    runs[name].append(timing)
            if rank == 0:
                print(f"{case_name}: round {r + 1}/{spec['warmup_rounds'] + spec['rounds']} done"
                      f"{' (warm-up)' if r < spec['warmup_rounds'] else ''}", file=sys.stderr, flush=True)
        result[case_name] = _summarise(case, runs)
    return result


def _summarise(case: dict, runs: dict) -> dict:
    """Medians over rounds; ratios of the medians, and the median of each round's own ratio (the variants
    of one round ran back to back, so a round's ratio is the least disturbed by other load on the machine)."""
    seconds = {}
    for name, timings in runs.items():
        means = [t["mean"] for t in timings]
        seconds[name] = {"median": statistics.median(means), "min": min(means), "max": max(means),
                         "rounds": means,
                         "median_single_iteration": statistics.median(t["median_iteration"] for t in timings),
                         "cpu_median": statistics.median(t["cpu"] for t in timings),
                         "main_thread_cpu_median": statistics.median(t["main_thread_cpu"] for t in timings),
                         "checks_ok": all(t["ok"] for t in timings)}
    ratios, paired, cpu = {}, {}, {}
    for top, bottom in (("trainer", "hand"), ("trainer", "accelerate"), ("accelerate", "hand")):
        key = f"{top}/{bottom}"
        ratios[key] = ratio(seconds[top]["median"], seconds[bottom]["median"])
        paired[key] = statistics.median(a["mean"] / b["mean"] for a, b in zip(runs[top], runs[bottom], strict=True))
        cpu[key] = ratio(seconds[top]["cpu_median"], seconds[bottom]["cpu_median"])
    return {"settings": case, "seconds_per_iteration": seconds, "ratios": ratios,
            "ratios_median_of_rounds": paired, "ratios_cpu_time": cpu}


def _verdict(value: float, target: float | None) -> str:
    return "" if target is None else ("met" if value <= target else "missed")


def _table(document: dict) -> str:
    lines = [f"{'case':<16}{'variant':<12}{'median ms/it':>13}{'min':>9}{'max':>9}{'median 1 it':>13}"
             f"{'CPU ms/it':>11}{'checks':>8}", "-" * 91]
    for case_name in document["settings"]["cases"]:
        case = document["results"][case_name]
        for name in VARIANTS:
            s = case["seconds_per_iteration"][name]
            lines.append(f"{case_name:<16}{name:<12}{s['median'] * 1e3:>13.3f}{s['min'] * 1e3:>9.3f}"
                         f"{s['max'] * 1e3:>9.3f}{s['median_single_iteration'] * 1e3:>13.3f}"
                         f"{s['cpu_median'] * 1e3:>11.3f}{'ok' if s['checks_ok'] else 'FAIL':>8}")
        lines.append(f"{'':<16}{'ratio':<20}{'of medians':>11}{'per round':>11}{'CPU time':>10}{'target':>8}")
        for key, value in case["ratios"].items():
            target, paired = case["targets"].get(key), case["ratios_median_of_rounds"][key]
            verdict = "" if target is None else f"≤ {target}: {_verdict(value, target)} / {_verdict(paired, target)}"
            lines.append(f"{'':<16}{key:<20}{value:>11.3f}{paired:>11.3f}{case['ratios_cpu_time'][key]:>10.3f}"
                         f"  {verdict}")
    checks = document["results"]["verification"]
    lines.append("float64 check vs one-process GD: " + ", ".join(
        f"{name} {c['max_rel_error']:.1e} {'ok' if c['ok'] else 'FAIL'}" for name, c in checks.items()))
    load = document["machine"]["load_average_1min"]
    lines.append(f"load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
                 f"on {document['machine']['cpu_count']} CPUs")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds of hand, trainer, accelerate")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10, help="the trainer's train.log_every")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round, no warm-up round")
    for case_name, case in CASES.items():
        for field, value in case.items():
            flag = f"--{case_name}-{field}".replace("_", "-")
            if isinstance(value, list):
                parser.add_argument(flag, type=int, nargs="+", default=None)
            else:
                parser.add_argument(flag, type=type(value), default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device, args.world_size)
    cases = {}
    for case_name in args.cases:
        case = {**CASES[case_name], **(QUICK[case_name] if args.quick else {})}
        for field in case:
            given = getattr(args, f"{case_name}_{field}")
            case[field] = given if given is not None else case[field]
        cases[case_name] = case
    rounds, warmup_rounds = (1, 0) if args.quick else (args.rounds, args.warmup_rounds)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ddp_bench_runs_") as tmp:
        spec = {"cases": cases, "rounds": rounds, "warmup_rounds": warmup_rounds, "log_every": args.log_every,
                "tmp": tmp}
        results = spawn(bench_worker, spec, args.world_size, device)
    for case_name in cases:
        results[case_name]["targets"] = copy.deepcopy(TARGETS[case_name])
    document = {
        "benchmark": "loop_overhead",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**machine(), "load_average_1min": [load_before, os.getloadavg()[0]]},
        "settings": {"world_size": args.world_size, "device": device, "backend": "nccl" if device == "cuda" else "gloo",
                     "threads_per_process": 1, "rounds": rounds, "warmup_rounds": warmup_rounds,
                     "trainer_log_every": args.log_every, "trainer_jsonl": True, "optimizer": "sgd momentum 0.9",
                     "cases": list(cases), "quick": args.quick},
        "results": results,
    }
    print(json.dumps(document, indent=2))
    print(_table(document), file=sys.stderr)


if __name__ == "__main__":
    main()
