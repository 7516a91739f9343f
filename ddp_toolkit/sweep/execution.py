"""Running a sweep's points: in this process (W = 1, accumulation) or as W workers under
torch.distributed.run. Either way the outcome (finished, diverged, failed) is the error type the trainer
raised, recorded in run_dir/outcome.json by `train_recording`; a rerun skips finished points.

The trainer's (W, k)-equivalence (same global batches, same mean gradient per step) makes both ways the same
run, up to floating-point summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import yaml

from ddp_toolkit.config import Config, ConfigError
from ddp_toolkit.errors import ToolkitError
from ddp_toolkit.launcher import torchrun_command
from ddp_toolkit.sweep.points import Point
from ddp_toolkit.sweep.results import PointResult, Status, collect_result, read_json

__all__ = ["MARKER", "OUTCOME", "is_finished", "run_point", "train_recording", "run_points"]

MARKER = "point.json"
"""Written by the sweep: this point's fingerprint and status (a rerun skips a finished or diverged point)."""
OUTCOME = "outcome.json"
"""Written by the run's rank 0: how training ended (status, error type and message)."""


def is_finished(point: Point) -> bool:
    """A finished run: run_dir/summary.json (or a recorded divergence) for exactly this point's config."""
    record = read_json(point.run_dir / MARKER)
    if not record or record.get("fingerprint") != point.fingerprint():
        return False
    if record.get("status") == "diverged":
        return True
    if not (point.run_dir / "summary.json").exists():
        return False
    summary = read_json(point.run_dir / "summary.json")
    return not summary.get("halted") and not summary.get("preempted")


def _clear_run_dir(run_dir: Path) -> None:
    """Remove a stale run (metrics.jsonl is appended to); refuse to touch a folder the sweep did not write."""
    if not run_dir.exists():
        return
    if not (run_dir / MARKER).exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run_dir {str(run_dir)!r} exists and was not written by a sweep; choose another --out")
    shutil.rmtree(run_dir)


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")


def _write_marker(point: Point, status: str, error: str | None = None) -> None:
    record = {"fingerprint": point.fingerprint(), "status": status, "rule": point.rule,
              "global_batch_size": point.global_batch_size, "seed": point.seed}
    _write_json(point.run_dir / MARKER, {**record, **({"error": error} if error else {})})


def train_recording(cfg: Config, env=None) -> dict:
    """Train one point and record how it ended, {status, error}, in run_dir/outcome.json (rank 0).

    The trainer raises TrainingStopped on a non-finite loss: the rule broke at this batch size (diverged).
    Any other ToolkitError is a run that broke (failed); anything else is a bug and propagates.
    """
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import TrainingStopped, train_from_config

    env = env or DistEnv.from_env()
    try:
        summary = train_from_config(cfg, env=env)
    except ToolkitError as err:
        status: Status = "diverged" if isinstance(err, TrainingStopped) else "failed"
        outcome = {"status": status, "error": f"{type(err).__name__}: {err}"}
    else:
        stopped = summary.get("halted") or summary.get("preempted")
        outcome = {"status": "failed", "error": "stopped before the end"} if stopped else {"status": "finished"}
    if env.is_main:
        _write_json(Path(cfg.run_dir) / OUTCOME, outcome)
    return outcome


def _train_launched(point: Point) -> int:
    """W workers of `python -m ddp_toolkit.sweep.worker` under torch.distributed.run; output in launch.log."""
    config_path = point.run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(point.config.model_dump(mode="json"), sort_keys=False))
    target = ["-m", "ddp_toolkit.sweep.worker", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(point.run_dir / "launch.log", "w") as fh:
        return subprocess.call(torchrun_command(target, nproc_per_node=point.world_size), stdout=fh,
                               stderr=subprocess.STDOUT, env=env)


def run_point(point: Point) -> Status:
    """Train one point (in this process when W = 1); returns finished, diverged or failed."""
    from ddp_toolkit.dist import DistEnv

    _clear_run_dir(point.run_dir)
    point.run_dir.mkdir(parents=True)
    _write_marker(point, "running")
    code = 0
    if point.world_size == 1:
        train_recording(point.config, env=DistEnv())
    else:
        code = _train_launched(point)
    outcome = read_json(point.run_dir / OUTCOME)
    if not outcome or (code and outcome.get("status") == "finished"):  # the launcher or another worker died
        log = point.run_dir / "launch.log"
        outcome = {"status": "failed", "error": f"torch.distributed.run exited with {code} (see {log})"}
    _write_marker(point, outcome["status"], outcome.get("error"))
    return outcome["status"]


def run_points(points: list[Point], counter: dict, say: Callable[[str], None],
               line: Callable[[PointResult], str]) -> list[PointResult]:
    """Train the points that are not finished (a shared run once); one result per point, in order."""
    done: dict[int, PointResult] = {}
    results = []
    for point in points:
        owner = point.same_as or point
        if id(owner) not in done:
            if is_finished(owner):
                counter["skipped"] += 1
                done[id(owner)] = collect_result(owner, "finished")
                say(f"[{owner.stage}] {owner.label}: finished earlier, skipped")
            else:
                t0 = time.perf_counter()
                done[id(owner)] = collect_result(owner, run_point(owner))
                counter["trained"] += 1
                say(f"[{owner.stage}] {owner.label}: {line(done[id(owner)])} ({time.perf_counter() - t0:.1f} s)")
        result = done[id(owner)]
        if point is not owner:
            result = replace(result, stage=point.stage, rule=point.rule, seed=point.seed)
            say(f"[{point.stage}] {point.label}: same run as [{owner.stage}] {owner.label}")
        results.append(result)
    return results


def set_threads(threads: int | None) -> int | None:
    """torch's intra-op threads for points trained here; returns the previous count (None: unchanged)."""
    if threads is None:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    return before
