"""Data wait: a dataset that sleeps per micro-batch, with train.num_workers = 0 and > 0 (W = 1, in process).

The Trainer's metrics rows carry `data_wait_fraction` = time waiting for the iteration's micro-batches /
iteration time (host clock). With a slow dataset and no workers the loop waits for every micro-batch; with
workers they load the next micro-batches while the model computes, and the fraction falls.

    python benchmarks/data_wait.py                    # sleep 40 ms per micro-batch, num_workers 0 and 2
    python benchmarks/data_wait.py --workers 0 1 2 4 --sleep-ms 20
    python benchmarks/data_wait.py --quick            # smoke test

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

from _common import document, make_data, make_model, parse_in_process, train_in_process

from ddp_toolkit.data import TensorData


class SlowData(TensorData):
    """TensorData whose batch fetch sleeps `sleep_s` (a disk or a decoder that is slower than the model)."""

    def __init__(self, data: TensorData, sleep_s: float) -> None:
        super().__init__(data.x, data.y)
        self.sleep_s = sleep_s

    def __getitems__(self, indices):
        time.sleep(self.sleep_s)
        return super().__getitems__(indices)


def run(workers: int, args: argparse.Namespace, tmp: str) -> dict:
    features, hidden, b, k = (16, [32], 8, 2) if args.quick else (256, [1024, 1024], 64, 2)
    data = SlowData(make_data(features, 10, b * k * (args.iterations + 1)), args.sleep_ms / 1e3)
    raw = {"batch": {"micro_batch_size": b, "grad_accum_steps": k},
           "train": {"iterations": args.iterations, "log_every": 1, "num_workers": workers,
                     "persistent_workers": workers > 0}}
    rows, _ = train_in_process(raw, make_model(features, 10, hidden), data, os.path.join(tmp, f"w{workers}"))
    timed = rows[1:]  # the first iteration starts the workers and counts FLOPs
    return {"num_workers": workers, "iterations_timed": len(timed),
            "data_wait_fraction_median": statistics.median(r["data_wait_fraction"] for r in timed),
            "iteration_ms_median": statistics.median(r["iteration_seconds"] for r in timed) * 1e3,
            "data_ms_median": statistics.median(r["data_seconds"] for r in timed) * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--sleep-ms", type=float, default=40.0, help="sleep per micro-batch fetch")
    parser.add_argument("--iterations", type=int, default=20)
    args = parse_in_process(parser, argv)
    if args.quick:
        args.iterations, args.sleep_ms = 4, 5.0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ddp_bench_data_wait_") as tmp:
        results = [run(w, args, tmp) for w in args.workers]
    settings = {"sleep_ms_per_micro_batch": args.sleep_ms, "iterations": args.iterations, "world_size": 1,
                "threads": 1, "quick": args.quick}
    print(json.dumps(document("data_wait", settings, results, load_before), indent=2))
    print(f"{'num_workers':>12}{'data wait':>11}{'iteration ms':>14}{'data ms':>9}", file=sys.stderr)
    for r in results:
        print(f"{r['num_workers']:>12}{r['data_wait_fraction_median']:>11.1%}{r['iteration_ms_median']:>14.2f}"
              f"{r['data_ms_median']:>9.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
