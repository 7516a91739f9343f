"""train.compile: the Trainer with torch.compile (inductor) next to eager, same model, data and seed.

W = 1 runs in this process; `--world-size 2` spawns the ranks (ddp engine, gloo), so the compiled forward runs
under DDP with no_sync on the first micro-step (one all-reduce round per iteration, checked).

Reported: the first iteration (compilation happens there), the median iteration after it, and the largest
difference of the loss curves (compiled kernels may sum in another order: close, not bit-identical).
On CPU inductor needs a C compiler; the default sizes are tiny so that compiling stays short.

    python benchmarks/compile_bench.py
    python benchmarks/compile_bench.py --hidden 1024 1024 --micro-batch-size 64 --iterations 30
    python benchmarks/compile_bench.py --world-size 2 # DDP + no_sync
    python benchmarks/compile_bench.py --quick        # smoke test

JSON on stdout, a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from _common import document, make_data, make_model, parse_in_process, train_in_process, train_spawned


def run(compiled: bool, args: argparse.Namespace, tmp: str) -> dict:
    b, k = args.micro_batch_size, 2
    size, run_dir = b * k * args.world_size * args.iterations, os.path.join(tmp, "compiled" if compiled else "eager")
    raw = {"batch": {"micro_batch_size": b, "grad_accum_steps": k},
           "train": {"iterations": args.iterations, "log_every": 1, "compile": compiled, "engine": "ddp"},
           "report": {"flops": False}}
    if args.world_size > 1:
        model = {"features": args.features, "classes": 10, "hidden": args.hidden}
        rows = train_spawned(raw, model, size, run_dir, args.world_size)
    else:
        rows, _ = train_in_process(raw, make_model(args.features, 10, args.hidden), make_data(args.features, 10, size),
                                   run_dir)
    seconds = [r["iteration_seconds"] for r in rows]
    return {"compile": compiled, "first_iteration_s": seconds[0],
            "median_iteration_ms": statistics.median(seconds[2:] or seconds) * 1e3,
            "losses": [r["loss"] for r in rows],
            "allreduce_rounds_per_iteration": sorted({r["allreduce_rounds_per_iteration"] for r in rows})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--world-size", type=int, default=1)
    args = parse_in_process(parser, argv)
    if args.quick:
        args.features, args.hidden, args.micro_batch_size, args.iterations = 8, [16], 4, 4
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ddp_bench_compile_") as tmp:
        eager, compiled = run(False, args, tmp), run(True, args, tmp)
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager["losses"], compiled["losses"], strict=True))
    results = {"eager": eager, "compiled": compiled, "loss_max_rel_diff": diff,
               "speedup_median": eager["median_iteration_ms"] / compiled["median_iteration_ms"]}
    print(json.dumps(document("compile", vars(args), results, load_before), indent=2))
    for r in (eager, compiled):
        print(f"{'compiled' if r['compile'] else 'eager':<9} first iteration {r['first_iteration_s']:.2f} s, "
              f"median {r['median_iteration_ms']:.2f} ms/iteration", file=sys.stderr)
    print(f"loss curves: max relative difference {diff:.2e}", file=sys.stderr)


if __name__ == "__main__":
    main()
