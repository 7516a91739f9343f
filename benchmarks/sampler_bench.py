"""Side-by-side benchmark: GlobalBatchSampler vs torch DistributedSampler (world 8, rank 0, shuffle=True).

For each dataset size N it reports time to first batch, peak memory and index throughput, each (sampler, N)
measured in fresh subprocesses so that peaks are independent. Prints one JSON document on stdout and a
short table on stderr.

    python benchmarks/sampler_bench.py                       # N = 1e6, 1e7, 1e8 (about 1-2 minutes)
    python benchmarks/sampler_bench.py --sizes 1e6 --indices 1e6

Definitions. time_to_first_batch_s: construct the sampler, start iterating, get the first micro-batch.
peak_rss_delta_mb: peak resident memory of the child minus its resident memory before construction,
over the first batch and the throughput window (includes torch tensors). tracemalloc_peak_mb: peak of
Python/numpy allocations over the same work, in a separate child because tracing slows allocation down
(skipped where that would take minutes: DistributedSampler at N > --trace-limit). indices_per_s: indices
handed out per second after the first batch, over --indices indices, both samplers yielding micro-batches
of 256 (DistributedSampler through torch's BatchSampler, as a DataLoader does), starting the next epoch
when one ends. permutation_indices_per_s: raw vectorised Permutation over 2e6 positions in one call
(after one warm-up call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler
from torch.utils.data.distributed import DistributedSampler

from ddp_toolkit.permutation import Permutation
from ddp_toolkit.sampler import GlobalBatchSampler

SAMPLERS = ("global_batch_sampler", "torch_distributed_sampler")
WORLD_SIZE, RANK, MICRO_BATCH_SIZE = 8, 0, 256
MB = 1024 * 1024


def _build(name: str, n: int) -> tuple[Iterable[list[int]], Callable[[int], None]]:
    """The sampler yielding rank 0's micro-batches of 256, and its set_epoch."""
    if name == "global_batch_sampler":
        global_batch_size = MICRO_BATCH_SIZE * WORLD_SIZE
        ours = GlobalBatchSampler(n, global_batch_size, MICRO_BATCH_SIZE, WORLD_SIZE, RANK, seed=0)
        return ours, ours.set_epoch
    theirs = DistributedSampler(range(n), num_replicas=WORLD_SIZE, rank=RANK, shuffle=True, seed=0)
    return BatchSampler(theirs, MICRO_BATCH_SIZE, drop_last=False), theirs.set_epoch


def _rss_bytes() -> int:
    """Current resident memory of this process (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _consume(sampler: Iterable[list[int]], stream: Iterator[list[int]], set_epoch: Callable[[int], None],
             count: int, target: int) -> int:
    """Pull micro-batches until `target` indices were handed out, starting new epochs as needed."""
    epoch = 0
    while count < target:
        for batch in stream:
            count += len(batch)
            if count >= target:
                break
        else:
            epoch += 1
            set_epoch(epoch)
            stream = iter(sampler)
    return count


def measure(name: str, n: int, num_indices: int, trace: bool) -> dict:
    """One child's measurement: first batch, then the throughput window (timed, or traced if `trace`)."""
    rss_before = _rss_bytes()
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    sampler, set_epoch = _build(name, n)
    stream = iter(sampler)
    first = next(stream)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    count = _consume(sampler, stream, set_epoch, len(first), num_indices)
    window_s = time.perf_counter() - start
    if trace:
        return {"tracemalloc_peak_mb": tracemalloc.get_traced_memory()[1] / MB}
    result = {
        "time_to_first_batch_s": first_batch_s,
        "peak_rss_delta_mb": (_peak_rss_bytes() - rss_before) / MB,
        "indices_per_s": (count - len(first)) / window_s,
    }
    if name == "global_batch_sampler":
        positions = np.arange(min(n, 2_000_000), dtype=np.int64)
        perm = Permutation(n, seed=0)
        perm(positions)  # warm-up: first-touch page faults of the work arrays
        start = time.perf_counter()
        perm(positions)
        result["permutation_indices_per_s"] = len(positions) / (time.perf_counter() - start)
    return result


def _run_child(name: str, n: int, num_indices: int, trace: bool) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", name, str(n), str(num_indices)]
    if trace:
        command.append("--trace")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def _table(rows: list[dict]) -> str:
    header = (f"{'sampler':<26}{'N':>12}{'first batch s':>15}{'RSS Δ MB':>11}{'tracemalloc MB':>16}"
              f"{'Mindices/s':>12}")
    lines = [header, "-" * len(header)]
    for row in rows:
        traced = row["tracemalloc_peak_mb"]
        lines.append(
            f"{row['sampler']:<26}{row['dataset_size']:>12.0e}{row['time_to_first_batch_s']:>15.4f}"
            f"{row['peak_rss_delta_mb']:>11.1f}{'skipped' if traced is None else f'{traced:.2f}':>16}"
            f"{row['indices_per_s'] / 1e6:>12.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every (sampler, N) in fresh children; print the JSON document and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    parser.add_argument("--indices", type=float, default=2e6, help="indices in the throughput window")
    parser.add_argument("--trace-limit", type=float, default=1e7,
                        help="largest N traced for DistributedSampler (tracing 1e8 takes minutes)")
    args = parser.parse_args(argv)
    rows, num_indices = [], int(args.indices)
    for n in map(int, args.sizes):
        for name in SAMPLERS:
            row = {"sampler": name, "dataset_size": n, **_run_child(name, n, num_indices, trace=False)}
            traced = name == "global_batch_sampler" or n <= args.trace_limit
            row["tracemalloc_peak_mb"] = (
                _run_child(name, n, num_indices, trace=True)["tracemalloc_peak_mb"] if traced else None
            )
            rows.append(row)
            print(f"done {name} N={n:.0e}", file=sys.stderr, flush=True)
    document = {
        "benchmark": "sampler",
        "settings": {"world_size": WORLD_SIZE, "rank": RANK, "micro_batch_size": MICRO_BATCH_SIZE,
                     "throughput_indices": num_indices, "shuffle": True},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "numpy": np.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "results": rows,
    }
    print(json.dumps(document, indent=2))
    print(_table(rows), file=sys.stderr)


def _child(argv: list[str]) -> None:
    name, n, num_indices = argv[0], int(argv[1]), int(argv[2])
    print(json.dumps(measure(name, n, num_indices, trace="--trace" in argv)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        main()
