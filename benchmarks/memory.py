"""Memory per rank: bytes of parameters, gradients and Adam state each rank holds, ddp vs fsdp vs ZeRO-3, W = 1, 2, 4.

Every case (engine, W) runs 2 iterations of the Trainer with Adam in W fresh processes (gloo on CPU) and, inside
the last `step()` of each rank, counts the bytes of the tensors that rank holds:
  parameters        ddp: the full parameters; fsdp: the local shards of the DTensor parameters (`to_local()`);
                    ZeRO-3: each parameter's partition (`ds_tensor`)
  fp32 master       ZeRO-3 only: the fp32 partitions the optimizer updates, when they are not the partitions above
                    (in fp32 training they are the same tensors and count 0)
  gradients         read before the update: ddp `p.grad`; fsdp the local gradient shards; ZeRO-3 the rank's
                    gradient partition buffer
  optimizer state   Adam's exp_avg and exp_avg_sq (local shards / the rank's partitions)
  peak RSS          `resource.getrusage` maxrss at the same moment (before the final checkpoint), and its growth
                    over the maxrss after the imports, before the model is built
Each figure is compared with 1/W of DDP's at the same W (DDP's figures do not depend on W). Tensors that are
not counted: DDP's gradient buckets, FSDP's gathered (unsharded) parameters between forward and backward,
ZeRO-3's communication buckets; the RSS shows them.

    python benchmarks/memory.py                      # MLP 512-2048-2048-10 (5.27 M parameters), W = 1 2 4
    python benchmarks/memory.py --quick              # W = 1 2, ddp and fsdp, a tiny MLP (the smoke test)

JSON on stdout, a Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from _common import document, make_data, make_model, spawn

ENGINES = ("ddp", "fsdp", "zero3")
KINDS = ("parameters", "fp32_master", "gradients", "optimizer_state")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _bytes(tensors) -> int:
    """Bytes of the tensors (DTensors: their local shard), each distinct tensor once."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _adam_state(optimizer: torch.optim.Optimizer) -> int:
    return _bytes(state[key] for state in optimizer.state.values() for key in ADAM_KEYS if key in state)


def measure_before_step(engine) -> dict:
    """Gradient bytes this rank holds, read after the synced backward and before the update."""
    if engine.name == "deepspeed":
        inner = engine.ds.optimizer
        buffer = getattr(inner, "grad_partitions_flat_buffer", None)
        if buffer is not None:
            return {"gradients": _bytes([buffer])}
        return {"gradients": _bytes(p.grad for p in inner.fp32_partitioned_groups_flat)}
    return {"gradients": _bytes(p.grad for g in engine.optimizer.param_groups for p in g["params"])}


def measure_after_step(engine) -> dict:
    """Parameter, master-weight and optimizer-state bytes after the update (Adam's state exists from now on)."""
    out = {"optimizer_state": _adam_state(engine.optimizer), "peak_rss": _maxrss_bytes()}
    if engine.name == "deepspeed":
        inner = engine.ds.optimizer
        partitions = {t.data_ptr() for t in inner.fp16_partitioned_groups_flat}
        out["parameters"] = _bytes(p.ds_tensor for p in engine.module.parameters())
        out["fp32_master"] = _bytes(t for t in inner.fp32_partitioned_groups_flat if t.data_ptr() not in partitions)
    else:
        out["parameters"] = _bytes(p for g in engine.optimizer.param_groups for p in g["params"])
        out["fp32_master"] = 0
    return out


def measuring_engine(name: str, figures: dict):
    """An engine factory for the Trainer: the toolkit's engine, its step() measuring around the update."""
    from ddp_toolkit.engines import engine_class

    base = engine_class(name)

    class Measuring(base):
        def step(self) -> None:
            figures.update(measure_before_step(self))
            super().step()
            figures.update(measure_after_step(self))

    return Measuring


def memory_worker(rank: int, world_size: int, port: int, device: str, spec: dict) -> dict:
    """Every engine of spec['engines'] in turn in these processes; every rank's figures per engine."""
    warnings.filterwarnings("ignore")
    if "zero3" in spec["engines"]:
        import deepspeed  # noqa: F401 - imported before the baseline, like torch
    from ddp_toolkit.trainer import Trainer  # noqa: F401 - imported before the baseline

    out = {}
    for engine in spec["engines"]:
        figures = train_and_measure(rank, world_size, {**spec, "engine": engine})
        gathered = [None] * world_size
        dist.all_gather_object(gathered, figures)
        out[engine] = gathered
    return out


def train_and_measure(rank: int, world_size: int, spec: dict) -> dict:
    """Two Trainer iterations with Adam on spec['engine']; this rank's figures."""
    from ddp_toolkit.config import Config
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import Trainer

    figures = {"baseline_rss": _maxrss_bytes()}
    engine = "deepspeed" if spec["engine"] == "zero3" else spec["engine"]
    b = spec["micro_batch_size"]
    cfg = Config.model_validate({
        "run_dir": str(Path(spec["tmp"]) / f"{spec['engine']}_w{world_size}"),
        "batch": {"micro_batch_size": b, "grad_accum_steps": 1, "drop_last": True},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"iterations": 2, "engine": engine, "seed": 0, "log_every": 1,
                  **({"zero_stage": 3} if engine == "deepspeed" else {})},
        "report": {"console": False, "jsonl": False},
    })
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                  launcher="benchmark")
    data = make_data(spec["features"], spec["classes"], b * world_size * 2)
    model = make_model(spec["features"], spec["classes"], spec["hidden"])
    Trainer(model, data, cfg, env=env, engine=measuring_engine(engine, figures)).fit()
    return figures


def run_cases(spec: dict, engines: list[str], world_size: int) -> list[dict]:
    """The engines at one W in one set of processes: a row per engine, or the error when the run fails."""
    try:
        result = spawn(memory_worker, {**spec, "engines": engines}, world_size, "cpu")
    except Exception as err:  # noqa: BLE001 - a failed case is reported, the others still run
        return [{"engine": engine, "world_size": world_size, "error": f"{type(err).__name__}: {err}"[:2000]}
                for engine in engines]
    return [_row(engine, world_size, result[engine]) for engine in engines]


def _row(engine: str, world_size: int, ranks: list[dict]) -> dict:
    row = {"engine": engine, "world_size": world_size, "ranks": ranks}
    for kind in (*KINDS, "peak_rss", "baseline_rss"):
        row[f"{kind}_max"] = max(r[kind] for r in ranks)
    row["peak_rss_growth_max"] = max(r["peak_rss"] - r["baseline_rss"] for r in ranks)
    row["total_max"] = max(sum(r[k] for k in KINDS) for r in ranks)
    return row


def add_ideal(rows: list[dict]) -> dict:
    """Each row's figures next to 1/W of DDP's; the issue's check on the optimizer state at W ≥ 2."""
    ddp = {row["world_size"]: row for row in rows if row["engine"] == "ddp" and "error" not in row}
    checks = {}
    for row in rows:
        reference = ddp.get(row["world_size"])
        if "error" in row or reference is None:
            continue
        w = row["world_size"]
        row["ratio_to_ideal"] = {kind: row[f"{kind}_max"] / (reference[f"{kind}_max"] / w)
                                 for kind in ("parameters", "gradients", "optimizer_state")}
        if row["engine"] != "ddp" and w >= 2:
            checks[f"{row['engine']}_w{w}_optimizer_state_within_10pct_of_ideal"] = (
                abs(row["ratio_to_ideal"]["optimizer_state"] - 1) <= 0.10)
    return checks


def _mb(value: float) -> str:
    return f"{value / 2**20:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| engine | W | parameters MiB | fp32 master MiB | gradients MiB | Adam state MiB | ideal Adam state "
             "(DDP / W) MiB | Adam state / ideal | peak RSS MiB | RSS growth MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ddp = {row["world_size"]: row for row in rows if row["engine"] == "ddp" and "error" not in row}
    for row in rows:
        w = row["world_size"]
        if "error" in row:
            lines.append(f"| {row['engine']} | {w} | failed: {row['error'].splitlines()[0][:120]} |||||||||")
            continue
        ideal = ddp[w]["optimizer_state_max"] / w if w in ddp else None
        lines.append(f"| {row['engine']} | {w} | {_mb(row['parameters_max'])} | {_mb(row['fp32_master_max'])} | "
                     f"{_mb(row['gradients_max'])} | {_mb(row['optimizer_state_max'])} | "
                     f"{_mb(ideal) if ideal else '–'} | "
                     f"{row['ratio_to_ideal']['optimizer_state']:.3f} | {_mb(row['peak_rss_max'])} | "
                     f"{_mb(row['peak_rss_growth_max'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 2048])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--device", choices=["cpu"], default="cpu", help="CPU only (gloo)")
    parser.add_argument("--shared-processes", action="store_true",
                        help="the engines at one W run in turn in the same processes (faster; peak RSS then "
                             "covers every case so far)")
    parser.add_argument("--quick", action="store_true",
                        help="W = 1 2, ddp and fsdp, MLP 32-256-256-10, shared processes (the smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.engines, args.world_sizes, args.features, args.hidden = ["ddp", "fsdp"], [1, 2], 32, [256, 256]
        args.shared_processes = True
    if "ddp" not in args.engines:
        args.engines = ["ddp", *args.engines]  # the reference
    load_before = os.getloadavg()[0]
    spec = {"features": args.features, "hidden": args.hidden, "classes": args.classes,
            "micro_batch_size": args.micro_batch_size}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp_bench_memory_") as tmp:
        for w in args.world_sizes:
            # fresh processes per case (its own peak RSS) unless --shared-processes
            for engines in [args.engines] if args.shared_processes else [[e] for e in args.engines]:
                rows += run_cases({**spec, "tmp": tmp}, engines, w)
                print(f"{' '.join(engines)} W={w} done", file=sys.stderr, flush=True)
    checks = add_ideal(rows)
    parameters = sum(p.numel() for p in make_model(args.features, args.classes, args.hidden).parameters())
    settings = {**spec, "engines": args.engines, "world_sizes": args.world_sizes, "backend": "gloo",
                "optimizer": "adam", "iterations": 2,
                "shared_processes": args.shared_processes, "parameters": parameters, "parameter_bytes": parameters * 4}
    out = {**document("memory", settings, rows, load_before), "checks": checks}
    print(json.dumps(out, indent=2))
    print(table(rows), file=sys.stderr)
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in checks.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
