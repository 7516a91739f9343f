"""Scaling estimate: iteration time and communication share at W = 8 … 1024 from one measured run (no torch).

Model (a ring all-reduce of the gradients once per iteration, not overlapped with compute — an upper bound on
its cost; DDP overlaps part of it with the last backward):

    comm(W)      = 2(W−1)/W × grad_bytes / bandwidth + 2(W−1) × latency      (reduce-scatter + all-gather)
    iteration(W) = k × micro_step + comm(W)
    share(W)     = comm(W) / iteration(W)

Accumulation hides communication when the share is at most `max_share`: c / (k·t + c) ≤ s ⇔ k ≥ c(1−s) / (s·t),
so `hiding_k` = ⌈c(1−s) / (s·t)⌉ (at least 1). The inputs come from flags (`ddp-toolkit plan --bandwidth 25GB/s
--grad-bytes 21MB --micro-step-ms 40`) or from a run's metrics.jsonl (`--from-run RUN_DIR`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["DEFAULT_LATENCY_S", "DEFAULT_WORLD_SIZES", "ScalingPoint", "estimate", "from_run", "hiding_k",
           "parse_bandwidth", "parse_size", "render", "ring_allreduce_seconds"]

DEFAULT_WORLD_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_LATENCY_S = 10e-6
"""Per ring step (one hop); NCCL between nodes is a few µs to tens of µs."""
DEFAULT_MAX_SHARE = 0.1

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_QUANTITY = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmgt]i?)?(b)?\s*", re.IGNORECASE)


def _quantity(text: str, what: str, example: str) -> tuple[float, str]:
    """(number × unit prefix, the `b`/`B` suffix or '') of `25G`, `1.5GiB`, `100Gb`, `2.1e7`."""
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(f"{what} {text!r}: expected a number with an optional unit, e.g. {example}")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} {text!r} must be a finite number > 0")
    return value, match.group(3) or ""


def parse_bandwidth(text: str) -> float:
    """Bytes per second of `25GB/s`, `200Gb/s` (bits: ÷ 8), `900GiB/s` or a plain number of bytes/s."""
    body = text.strip()
    body = body[:-2] if body.lower().endswith("/s") else body
    value, suffix = _quantity(body, "bandwidth", "25GB/s or 200Gb/s")
    return value / 8 if suffix == "b" else value


def parse_size(text: str) -> int:
    """Bytes of `21MB`, `1.5GiB`, `2.1e7` (a lower-case b means bits)."""
    value, suffix = _quantity(text, "size", "21MB or 2.1e7")
    return max(1, round(value / 8 if suffix == "b" else value))


def ring_allreduce_seconds(grad_bytes: float, world_size: int, bandwidth: float,
                           latency_s: float = DEFAULT_LATENCY_S) -> float:
    """2(W−1)/W × bytes / bandwidth + 2(W−1) × latency; 0 for one rank."""
    steps = 2 * (world_size - 1)
    return steps / world_size * grad_bytes / bandwidth + steps * latency_s


def hiding_k(comm_s: float, micro_step_s: float, max_share: float = DEFAULT_MAX_SHARE) -> int:
    """The smallest k with comm / (k·micro_step + comm) ≤ max_share."""
    if comm_s <= 0:
        return 1
    return max(1, math.ceil(comm_s * (1 - max_share) / (max_share * micro_step_s) - 1e-9))


@dataclass(frozen=True)
class ScalingPoint:
    """The estimate at one world size (seconds; share in [0, 1])."""

    world_size: int
    comm_seconds: float
    iteration_seconds: float
    comm_share: float
    hiding_k: int


def estimate(grad_bytes: float, micro_step_s: float, bandwidth: float, *, grad_accum_steps: int = 1,
             latency_s: float = DEFAULT_LATENCY_S, world_sizes: tuple[int, ...] = DEFAULT_WORLD_SIZES,
             max_share: float = DEFAULT_MAX_SHARE) -> list[ScalingPoint]:
    """One ScalingPoint per world size for k = grad_accum_steps micro-steps of `micro_step_s` each."""
    points = []
    for w in world_sizes:
        comm = ring_allreduce_seconds(grad_bytes, w, bandwidth, latency_s)
        iteration = grad_accum_steps * micro_step_s + comm
        points.append(ScalingPoint(w, comm, iteration, comm / iteration, hiding_k(comm, micro_step_s, max_share)))
    return points


def _rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if isinstance(row, dict) and "iteration" in row and "loss" in row:
            rows.append(row)
    return rows


def from_run(run_dir: Path | str) -> dict:
    """grad_bytes and micro_step_seconds measured by a run: metrics.jsonl's all-reduce bytes per round (else the
    size of final/model.safetensors, W = 1) and the median of compute_seconds / k (else iteration_seconds / k)
    over the logged rows after the first. Raises ValueError with one line when the run has neither."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"--from-run {run_dir}: no metrics.jsonl there")
    rows = _rows(path)
    timed = [r for r in rows[1:] or rows if (r.get("compute_seconds") or r.get("iteration_seconds"))]
    if not timed:
        raise ValueError(f"--from-run {run_dir}: metrics.jsonl has no timed rows (compute_seconds)")
    k = int(timed[-1].get("grad_accum_steps", 1))
    source = "compute_seconds" if timed[-1].get("compute_seconds") else "iteration_seconds"
    micro_step = statistics.median(r.get(source) or 0.0 for r in timed) / k
    rounds = [r for r in rows if r.get("allreduce_rounds_per_iteration")]
    if rounds:
        grad_bytes = rounds[-1]["allreduce_bytes_per_iteration"] / rounds[-1]["allreduce_rounds_per_iteration"]
        bytes_from = "allreduce_bytes_per_iteration"
    elif (run_dir / "final" / "model.safetensors").is_file():
        grad_bytes, bytes_from = (run_dir / "final" / "model.safetensors").stat().st_size, "final/model.safetensors"
    else:
        raise ValueError(f"--from-run {run_dir}: no all-reduce bytes in metrics.jsonl and no final weights; "
                         f"give --grad-bytes")
    return {"grad_bytes": float(grad_bytes), "micro_step_seconds": micro_step, "grad_accum_steps": k,
            "world_size": int(timed[-1].get("world_size", 1)), "micro_step_from": f"{source} / k",
            "grad_bytes_from": bytes_from}


def as_dict(points: list[ScalingPoint], inputs: dict) -> dict:
    """The estimate as JSON: the inputs and one row per world size."""
    return {**inputs, "model": "ring all-reduce, not overlapped: k·t + 2(W−1)/W·bytes/bandwidth + 2(W−1)·latency",
            "points": [asdict(p) for p in points]}


def render(points: list[ScalingPoint], inputs: dict) -> str:
    """A plain-text table: W, all-reduce ms, iteration ms, communication share, k that hides it."""
    lines = [f"scaling estimate: ring all-reduce of {inputs['grad_bytes'] / 1e6:.3g} MB at "
             f"{inputs['bandwidth'] / 1e9:.3g} GB/s, {inputs['latency_s'] * 1e6:.3g} µs per step; "
             f"micro-step {inputs['micro_step_seconds'] * 1e3:.3g} ms, k = {inputs['grad_accum_steps']}",
             f"{'W':>6}{'all-reduce ms':>15}{'iteration ms':>14}{'comm share':>12}"
             f"{'k for ≤ ' + format(inputs['max_share'], '.0%'):>12}"]
    for p in points:
        lines.append(f"{p.world_size:>6}{p.comm_seconds * 1e3:>15.3f}{p.iteration_seconds * 1e3:>14.3f}"
                     f"{p.comm_share:>12.1%}{p.hiding_k:>12}")
    lines.append("(no overlap of the all-reduce with the backward: an upper bound on its cost)")
    return "\n".join(lines)
